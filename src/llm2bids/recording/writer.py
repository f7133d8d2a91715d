"""Writer threads: the host side of recording, which only writes bold files.

Several threads write at once (one thread cannot keep a fast disk busy: measured on an H100
host, one thread wrote 3-4 GB/s where four wrote 10 GB/s). Each run is one task; a task
finishes on its own, so a batch's runs need not wait for each other. How much is in flight is
bounded by the caller: by the ring of run buffers for staged recordings, by two host batches on
the CPU (see :mod:`.pipeline`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

import numpy as np

from ..bids.dataset import REPETITION_TIME
from ..bids.geometry import VoxelGeometry
from ..bids.nifti import write_run, write_run_pieces
from ..exceptions import NumericalError
from ..stimuli import RunStimulus

logger = logging.getLogger("llm2bids.recording")

#: Bytes of a layer's row (its neurons at one token) from which CPU runs are written with
#: gather writes straight from the activations; smaller rows are first assembled into a
#: scratch piece of :data:`SCRATCH_BYTES` (a gather write costs about a microsecond per
#: buffer: on the 2-core VM, four SmolLM2 runs, 1,536 neurons a row, wrote in 0.18 s gathered
#: and 0.06-0.07 s assembled, against 0.045 s for a plain write; 8,192 neurons wrote in
#: 0.075-0.08 s either way).
GATHER_FROM_BYTES = 16 << 10
SCRATCH_BYTES = 4 << 20
#: Niceness of the writer threads of a recording whose forward pass runs on the CPU (the
#: highest: they take the cores the forward pass leaves, and all of them between batches and
#: at the end). Writers at the forward pass's priority preempt its intra-op threads, which
#: then wait for each other: on the 2-core VM, SmolLM2 recorded 4k tokens in 12.4 s with two
#: writers at niceness 0, 11.2 / 11.0 / 10.6 s at 5 / 10 / 19, against a bare backbone pass
#: of 9.7 s (medians of 7 rotated repeats). The price: on a machine busy with other
#: processes, the writers yield to those too.
CPU_WRITER_NICENESS = 19


def default_writers() -> int:
    """Writer threads used by default: 4, or fewer on a machine with fewer cores."""
    return max(1, min(4, os.cpu_count() or 1))


class WriterPool:
    """Run write tasks on ``n_threads`` background threads; the first error stops the rest.

    Parameters
    ----------
    n_threads : int or None, default=None
        Writer threads; ``None`` takes :func:`default_writers`.
    niceness : int, default=0
        Raise each writer thread's niceness by this much, so that the threads computing the
        forward pass come first (Linux; elsewhere nothing changes).

    Notes
    -----
    An exception raised by a task is kept; tasks that start after it do nothing (their
    ``finally`` callbacks still run, so buffers are given back and nobody waits forever), and
    it is re-raised in the caller's thread at the next :meth:`submit`, :meth:`wait`,
    :meth:`check` or :meth:`close`.
    """

    def __init__(self, n_threads: int | None = None, niceness: int = 0):
        self.n_threads = n_threads or default_writers()
        self._pool = ThreadPoolExecutor(
            self.n_threads,
            thread_name_prefix="llm2bids-writer",
            initializer=_lower_priority if niceness else None,
            initargs=(niceness,) if niceness else (),
        )
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(self, task: Callable[[], None], then: Callable[[], None] | None = None) -> Future:
        """Queue ``task``; ``then`` runs after it whatever happens (for example, a release)."""
        self.check()
        return self._pool.submit(self._run, task, then)

    def _run(self, task, then) -> None:
        try:
            if self._error is None:  # after a failure, drain without work
                task()
        except BaseException as err:  # re-raised in the caller's thread
            with self._lock:
                self._error = self._error or err
        finally:
            if then is not None:
                then()

    def check(self) -> None:
        """Raise the first error a task met, if any."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait(self, futures) -> None:
        """Block until ``futures`` are done, then raise any error a task met."""
        wait_futures(list(futures))
        self.check()

    def close(self, cancel: bool = False) -> None:
        """Finish (or, with ``cancel``, drop) the queued tasks, stop the threads, raise errors."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        if not cancel:
            self.check()


def _lower_priority(niceness: int) -> None:
    """Raise the calling thread's niceness by ``niceness`` (Linux: a thread's own; elsewhere
    ``setpriority`` would apply to the whole process, so nothing is done)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # never fatal: the writes only go slower
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))


class RunWriter:
    """Writes one run's bold file (its events file is written before, by the pipeline).

    Parameters
    ----------
    geometry : VoxelGeometry
    layers : list of int
        The recorded layers (named in the error for a non-finite activation).
    drop_behind : bool, default=False
        Write ``.nii`` files with drop-behind (see :mod:`llm2bids._writeback`).
    """

    def __init__(self, geometry: VoxelGeometry, layers: list[int], drop_behind: bool = False):
        self.geometry = geometry
        self.layers = layers
        self.drop_behind = drop_behind
        self._local = threading.local()  # each writer thread's scratch piece

    def block_task(self, block, finite: bool, run: RunStimulus, paths, landed=None):
        """A callable that writes a ready data block (staged recordings).

        Parameters
        ----------
        block : torch.Tensor
            The run's ``(n_tokens, n_layers, slice_size)`` float32 block in host memory.
        finite : bool
            Whether the device found every value finite.
        run : RunStimulus
        paths : tuple of Path
            The run's ``_bold`` and ``_events.tsv`` files.
        landed : torch.cuda.Event or None, default=None
            Recorded after the block's device-to-host copy; waited for before writing.
        """
        return functools.partial(self._write_block, block, finite, run, paths, landed)

    def layers_task(self, layers: list[np.ndarray], run: RunStimulus, paths):
        """A callable that writes a run from per-layer ``(n_tokens, width)`` arrays (CPU).

        Parameters
        ----------
        layers : list of ndarray
        run : RunStimulus
        paths : tuple of Path
            The run's ``_bold`` and ``_events.tsv`` files.
        """
        return functools.partial(self._write_layers, layers, run, paths)

    def _write_block(self, block, finite, run, paths, landed) -> None:
        if landed is not None:
            landed.synchronize()
        array = block.numpy()  # contiguous: the run's NIfTI data block
        if not finite:
            self._fail(
                [array[:, z, : self.geometry.n_neurons] for z in range(array.shape[1])], run, paths
            )
        write_run(paths[0], array, self.geometry, REPETITION_TIME, self.drop_behind)

    def _write_layers(self, layers, run, paths) -> None:
        bold = paths[0]
        try:
            if bold.name.endswith(".gz"):  # compressed: nibabel needs the whole block
                block = self.geometry.empty_block(len(run))
                for z, layer in enumerate(layers):
                    block[:, z, : layer.shape[1]] = layer
                if not np.isfinite(block).all():
                    _raise_nonfinite(layers, run, self.layers)
                write_run(bold, block, self.geometry, REPETITION_TIME)
            else:  # laid out by the writes themselves, each piece checked as it goes
                pieces = self._checked_pieces(layers, run)
                write_run_pieces(
                    bold, pieces, self.geometry, len(run), REPETITION_TIME, self.drop_behind
                )
        except NumericalError:
            Path(paths[1]).unlink(missing_ok=True)  # nothing of the run stays
            raise

    def _fail(self, layers, run, paths) -> None:
        Path(paths[1]).unlink(missing_ok=True)
        _raise_nonfinite(layers, run, self.layers)

    def _checked_pieces(self, layers: list[np.ndarray], run: RunStimulus):
        """The run's data block piece by piece, each checked finite just before it is written.

        The check reads a piece the write reads right after, from the cache. Layers of small
        rows are assembled into this thread's scratch piece first (see
        :meth:`~llm2bids.bids.geometry.VoxelGeometry.block_pieces`).
        """
        scratch = None
        if layers[0].shape[1] * 4 < GATHER_FROM_BYTES:
            scratch = self._scratch()
        for start, stop, buffers in self.geometry.block_pieces(layers, scratch=scratch):
            if scratch is not None:
                piece = [scratch[: stop - start]]
            else:
                piece = [layer[start:stop] for layer in layers]
            if not _finite(piece):
                _raise_nonfinite(layers, run, self.layers)
            yield buffers

    def _scratch(self) -> np.ndarray:
        """This writer thread's zeroed scratch piece (about :data:`SCRATCH_BYTES`)."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            tokens = max(1, SCRATCH_BYTES // (4 * self.geometry.volume_size))
            scratch = self.geometry.empty_block(tokens)
            self._local.scratch = scratch
        return scratch


def _finite(arrays: list[np.ndarray]) -> bool:
    """Whether every value of ``arrays`` is finite, exactly, reading the values once.

    ``x . x`` is NaN or infinite when any ``x`` is NaN or infinite, and finite otherwise unless
    it overflows (values past about 1.8e19); only then are the values checked one by one.
    BLAS computes it at close to memory speed, from one stream (a dot product with a zero
    vector, as before, read twice the bytes). Floating-point warnings are silenced once for
    all the arrays (``errstate`` costs microseconds: once per array it was a third of the
    check's time on 32 KB rows).
    """
    with np.errstate(all="ignore"):
        for values in arrays:
            flat = values.reshape(-1)
            if not (np.isfinite(np.dot(flat, flat)) or np.isfinite(flat).all()):
                return False
    return True


def _raise_nonfinite(layers: list[np.ndarray], run: RunStimulus, layer_ids: list[int]) -> None:
    """Raise for the run whose per-layer ``(tokens, width)`` values hold a NaN or an Inf."""
    bad = [~np.isfinite(layer) for layer in layers]
    # NaN spreads forward (through attention, 0 * NaN = NaN): report where it starts, the
    # earliest layer, then the earliest token in it.
    z = next(z for z, b in enumerate(bad) if b.any())
    t = int(np.flatnonzero(bad[z].any(axis=1))[0])
    raise NumericalError(
        f"run {run.index} ({run.document}): NaN or Inf activation at layer {layer_ids[z]}, "
        f"token {t} (token id {int(run.token_ids[t])}); {sum(int(b.sum()) for b in bad)} values "
        "in all. In float16 this is usually overflow: record with --dtype bfloat16 or float32. "
        "Nothing of this run was written."
    )
