"""Writer threads: the host side of recording, which only writes.

The forward pass of the next batch runs while these threads write the previous batch's runs,
several at a time (one thread cannot keep a fast disk busy: measured on an H100 host, one
thread wrote 3-4 GB/s where four wrote 10 GB/s). A batch is handed over only once the batch
before it is written, so at most two batches are in host memory (the one being written and the
one being captured), however many runs there are.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..bids.dataset import REPETITION_TIME
from ..bids.events import events_frame, write_events
from ..bids.geometry import VoxelGeometry
from ..bids.nifti import write_run, write_run_pieces
from ..exceptions import NumericalError
from ..stimuli import RunStimulus
from .capture import CapturedBatch

logger = logging.getLogger("llm2bids.recording")

_STOP = object()


def default_writers() -> int:
    """Writer threads used by default: 4, or fewer on a machine with fewer cores."""
    return max(1, min(4, os.cpu_count() or 1))


class BackgroundWriter:
    """Run the tasks of each submitted batch on ``n_threads`` background threads.

    Parameters
    ----------
    n_threads : int or None, default=None
        Writer threads; ``None`` takes :func:`default_writers`.

    Notes
    -----
    An exception raised by a task stops all further work (remaining tasks are skipped) and is
    re-raised in the caller at the next :meth:`submit` or at :meth:`close`.
    """

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or default_writers()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._pending: _Batch | None = None
        self._threads = [
            threading.Thread(target=self._loop, name=f"llm2bids-writer-{i}", daemon=True)
            for i in range(self.n_threads)
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch, task = item
            try:
                if self._error is None:  # after a failure, drain without work
                    task()
            except BaseException as err:  # re-raised in the caller's thread
                with self._lock:
                    self._error = self._error or err
            finally:
                del task, item
                batch.done_one()

    def _wait_and_raise(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Hand over one batch's tasks; blocks until the previously submitted batch is written."""
        self._wait_and_raise()
        batch = _Batch(len(tasks))
        for task in tasks:
            self._queue.put((batch, task))
        self._pending = batch

    def close(self) -> None:
        """Finish the last batch, stop the threads, and raise any error they met."""
        try:
            self._wait_and_raise()
        finally:
            for _ in self._threads:
                self._queue.put(_STOP)
            for thread in self._threads:
                thread.join()


class _Batch:
    """Counts a batch's unfinished tasks."""

    def __init__(self, n: int):
        self._left = n
        self._cond = threading.Condition()

    def done_one(self) -> None:
        with self._cond:
            self._left -= 1
            if self._left <= 0:
                self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._left <= 0)


class RunWriter:
    """Writes the runs of captured batches: events, then the bold file (header + raw block).

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Decodes each run's tokens for its events (one call per run).
    geometry : VoxelGeometry
    layers : list of int
        The recorded layers (named in the error for a non-finite activation).
    """

    def __init__(self, tokenizer, geometry: VoxelGeometry, layers: list[int]):
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.layers = layers
        self._decode_lock = threading.Lock()  # tokenizers are not documented as thread-safe

    def task(self, captured: CapturedBatch, row: int, run: RunStimulus, paths: tuple[Path, Path]):
        """A callable that writes ``run`` (row ``row`` of ``captured``) to ``paths``.

        Parameters
        ----------
        captured : CapturedBatch
        row : int
            The run's row in the batch.
        run : RunStimulus
        paths : tuple of Path
            The run's ``_bold`` and ``_events.tsv`` files.
        """
        return functools.partial(self._write, captured, row, run, paths)

    def _write(self, captured: CapturedBatch, row: int, run: RunStimulus, paths) -> None:
        bold, events = paths
        n = len(run)
        captured.wait()
        if captured.layers is None:  # laid out and checked where it was captured
            block = captured.host[row, :n].numpy()  # contiguous: the run's NIfTI data block
            if not captured.finite[row]:
                _raise_nonfinite([block[:, z] for z in range(block.shape[1])], run, self.layers)
        else:
            layers = captured.run_layers(row, n)
            block = None
            if bold.name.endswith(".gz"):  # compressed: nibabel needs the whole block
                block = self.geometry.empty_block(n)
                for z, layer in enumerate(layers):
                    block[:, z, : layer.shape[1]] = layer
                if not np.isfinite(block).all():
                    _raise_nonfinite(layers, run, self.layers)
        with self._decode_lock:  # one call per run
            tokens = self.tokenizer.batch_decode([[int(t)] for t in run.token_ids])
        write_events(events, events_frame(run.token_ids, tokens, run.conditions, run.special))
        try:  # the bold file last: it marks the run done
            if block is not None:
                write_run(bold, block, self.geometry, REPETITION_TIME)
            else:  # laid out by the writes themselves, each piece checked as it goes
                pieces = self._checked_pieces(layers, run)
                write_run_pieces(bold, pieces, self.geometry, n, REPETITION_TIME)
        except NumericalError:
            events.unlink(missing_ok=True)
            raise

    def _checked_pieces(self, layers: list[np.ndarray], run: RunStimulus):
        """The run's data block piece by piece, each checked finite just before it is written.

        The check reads a piece the gather write reads right after, from the cache.
        """
        for start, stop, buffers in self.geometry.block_pieces(layers):
            if not all(_finite(layer[start:stop]) for layer in layers):
                _raise_nonfinite(layers, run, self.layers)
            yield buffers


def _finite(values: np.ndarray) -> bool:
    """Whether every value is finite, exactly: the dot product with zeros is 0 (NaN otherwise).

    ``x * 0`` is NaN for a NaN or an infinity and 0 for any finite ``x``, so nothing can
    overflow; BLAS computes it at close to memory speed.
    """
    flat = values.reshape(-1)
    with np.errstate(invalid="ignore"):
        return not np.dot(flat, _zeros(flat.size))  # NaN is truthy


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float32)


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
