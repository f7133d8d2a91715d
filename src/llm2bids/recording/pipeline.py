"""One ``record()`` call's path from hooked activations to closed files.

:class:`RecordingPipeline` owns everything a recording allocates: the capture's memory (the
device stage and a ring of run buffers when the recorded layers run on an accelerator; layer
slabs for small CPU batches), the writer threads and the token texts of the events. It is made
once per call and shared by the call's tasks; its memory is allocated when the first batch
needs it and given back by :meth:`RecordingPipeline.close`, also on error.

Per batch, after the forward pass:

- **staged** (accelerator): each run is copied on its own from the stage into a free ring
  buffer, with an event recorded after its copy; its events file is written; its bold file is
  queued. A writer waits for that run's event only, writes, and frees the buffer. Nothing waits
  for a whole batch: the next forward pass starts as soon as every run of this batch has a
  buffer (the copies are queued on the compute stream before that pass, so it cannot overwrite
  the stage before they have read it).
- **CPU**: the events files are written and every run queued; the batch before this one must
  be written first, since its slot (or its kept tensors) is what the next forward pass reuses:
  two batches in host memory at most.

Events are written by the recording's own thread (they are small and their token texts are
decoded once per recording, see :class:`~llm2bids.bids.events.TokenCells`), always before the
run's bold file, which marks the run done.
"""

from __future__ import annotations

import contextlib
import functools
import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bids.events import TokenCells, run_events, write_events
from ..bids.geometry import VoxelGeometry
from ..stimuli import RunStimulus
from .buffers import KEEP_ABOVE, RING_PER_WRITER, SLOTS, DeviceStage, LayerSlabs, RunRing
from .capture import BatchCapture, CapturedBatch
from .writer import CPU_WRITER_NICENESS, RunWriter, WriterPool, default_writers

RING_BYTES = 2 << 30  # host bytes in flight the ring aims at (within its bounds, see MemoryPlan)
#: Whether staged recordings write with drop-behind too (see MemoryPlan.drops_behind); to be
#: decided by the GPU benchmark, which times both.
STAGED_DROP_BEHIND = False


def stages_on(device: torch.device) -> bool:
    """Whether activations computed on ``device`` are staged there (every device but the CPU)."""
    return torch.device(device).type != "cpu"


@dataclass(frozen=True)
class MemoryPlan:
    """What one recording holds, fixed before anything is written.

    Attributes
    ----------
    geometry : VoxelGeometry
    device : torch.device
        Where the recorded layers run (the capture device).
    staged : bool
        Whether activations are staged on ``device`` (see :func:`stages_on`).
    batch_rows : int
        Rows of the largest batch.
    max_tokens : int
        Tokens of the longest run.
    capacity : int
        Largest ``rows * tokens`` of a batch.
    n_batches, n_runs : int
        Batches and runs of the whole call, every task together.
    n_writers : int
        Writer threads.
    """

    geometry: VoxelGeometry
    device: torch.device
    staged: bool
    batch_rows: int
    max_tokens: int
    capacity: int
    n_batches: int
    n_runs: int
    n_writers: int

    @classmethod
    def of(cls, geometry, device, staged, batches, n_writers=None) -> MemoryPlan:
        """The plan of a call's batches (lists of runs, every task's together)."""
        return cls(
            geometry=geometry,
            device=torch.device(device),
            staged=bool(staged),
            batch_rows=max(len(b) for b in batches),
            max_tokens=max(len(r) for b in batches for r in b),
            capacity=max(len(b) * max(len(r) for r in b) for b in batches),
            n_batches=len(batches),
            n_runs=sum(len(b) for b in batches),
            n_writers=n_writers or default_writers(),
        )

    @property
    def run_bytes(self) -> int:
        """Bytes of the longest run's data block."""
        return self.max_tokens * self.geometry.volume_size * 4

    @property
    def ring_buffers(self) -> int:
        """Run buffers of the ring (staged): about :data:`RING_BYTES`, at least two per writer,
        at most one batch, never more than there are runs."""
        wanted = math.ceil(RING_BYTES / self.run_bytes)
        low = RING_PER_WRITER * self.n_writers
        return max(1, min(self.n_runs, max(low, min(wanted, self.batch_rows))))

    @property
    def drops_behind(self) -> bool:
        """Whether bold files are written with drop-behind (:mod:`llm2bids._writeback`).

        On the CPU, activations come at the forward pass's pace (SmolLM2 on two cores: about
        80 MB/s), which a disk keeps up with: the page cache would only fill with a recording
        nobody reads back soon, and on this project's VM every cold page it takes costs a
        hypervisor fault (SmolLM2 recorded 16k tokens in 39 s instead of 43 s, 4k in 11.4 s
        instead of 11.6 s, medians of four alternated repeats). Staged on an accelerator,
        activations come at gigabytes a second, bursts that the page cache absorbs faster
        than a disk: :data:`STAGED_DROP_BEHIND`.
        """
        return STAGED_DROP_BEHIND if self.staged else True

    @property
    def writer_niceness(self) -> int:
        """How much lower than the forward pass the writer threads run (see
        :class:`~.writer.WriterPool`): :data:`~.writer.CPU_WRITER_NICENESS` when the forward
        pass computes on the CPU, whose cores the writers share; staged, 0 (the forward pass
        runs on the accelerator; left to the GPU benchmark to say otherwise)."""
        return 0 if self.staged else CPU_WRITER_NICENESS

    @property
    def keeps_model_tensors(self) -> bool:
        """CPU: whether each layer's batch is kept as the model made it (large) or copied into
        a slab (small; see :mod:`.buffers`)."""
        return self.capacity * self.geometry.n_neurons * 4 >= KEEP_ABOVE

    @property
    def slots(self) -> int:
        """CPU host slots: two, or one for a recording of one batch."""
        return min(SLOTS, self.n_batches)

    @property
    def host_bytes(self) -> int:
        """Host memory of activations the recording holds at most."""
        if self.staged:
            return self.ring_buffers * self.run_bytes
        return self.slots * self.capacity * self.geometry.n_total * 4

    @property
    def device_bytes(self) -> int:
        """Memory of the stage on the capture device (0 without one)."""
        if not self.staged:
            return 0
        return self.batch_rows * self.max_tokens * self.geometry.volume_size * 4


class RecordingPipeline:
    """Capture, transport and writers of one ``record()`` call (see the module docstring).

    Parameters
    ----------
    plan : MemoryPlan
    layers : list of int
        The recorded layers.
    tokenizer : transformers tokenizer
        Decodes the token texts of the events, once per distinct id.
    """

    def __init__(self, plan: MemoryPlan, layers: list[int], tokenizer):
        self.plan = plan
        self.cells = TokenCells(tokenizer)
        self.run_writer = RunWriter(plan.geometry, layers, plan.drops_behind)
        self.writers = WriterPool(plan.n_writers, plan.writer_niceness)
        self._layers = layers
        self._capture: BatchCapture | None = None
        self._memory: list = []  # stage, ring, slabs: whatever was allocated
        self._ring: RunRing | None = None
        self._previous: list[Future] = []
        self._runs: list[tuple[Path, Path]] = []  # (bold, events) of every run begun
        self._batches = 0

    @property
    def capture(self) -> BatchCapture:
        """The hooks' target; the recording's memory is allocated on first use."""
        if self._capture is None:
            plan, stage, slabs = self.plan, None, None
            if plan.staged:
                self._ring = RunRing(
                    plan.ring_buffers, plan.max_tokens * plan.geometry.volume_size, plan.device
                )
                self._memory.append(self._ring)  # preparing in the background from now on
                stage = DeviceStage(plan.batch_rows, plan.max_tokens, plan.geometry, plan.device)
                self._memory.append(stage)
            elif not plan.keeps_model_tensors:
                slabs = LayerSlabs(plan.capacity, plan.geometry, plan.slots)
                self._memory.append(slabs)
            self._capture = BatchCapture(self._layers, plan.geometry.n_neurons, stage, slabs)
        return self._capture

    def allocate(self, wait: bool = False) -> None:
        """Allocate the recording's memory now (it is otherwise allocated on first use).

        Parameters
        ----------
        wait : bool, default=False
            Also wait until the ring's buffers are faulted in and page-locked (they are
            prepared in the background otherwise). The benchmarks time setup this way.
        """
        self.capture  # noqa: B018 (the property allocates)
        if wait and self._ring is not None:
            self._ring.wait_ready()

    @property
    def slot(self) -> int:
        """The host slot the next batch is captured into (CPU)."""
        return self._batches % self.plan.slots

    def add_tokens(self, runs: list[RunStimulus]) -> None:
        """Decode the token texts of ``runs`` that are new to this recording (one call)."""
        self.cells.add([t for r in runs for t in r.token_ids.tolist()])

    def write(self, captured: CapturedBatch, batch: list[RunStimulus], rows, paths: dict) -> None:
        """Write the runs ``rows`` of a captured batch (see the module docstring).

        Parameters
        ----------
        captured : CapturedBatch
        batch : list of RunStimulus
            The batch's runs, by row.
        rows : sequence of int
            The rows to write (runs already recorded are left out).
        paths : dict of int to tuple of Path
            Each run index's ``_bold`` and ``_events.tsv`` files.
        """
        self._batches += 1
        if captured.blocks is not None:
            for row in rows:
                self._write_staged(captured, row, batch[row], paths[batch[row].index])
            return
        self.writers.wait(self._previous)  # its slot (or kept tensors) is reused next
        futures = []
        for row in rows:
            run = batch[row]
            self._write_events(run, paths[run.index])
            layers = captured.run_layers(row, len(run))
            futures.append(
                self.writers.submit(self.run_writer.layers_task(layers, run, paths[run.index]))
            )
        self._previous = futures

    def _write_staged(self, captured: CapturedBatch, row: int, run: RunStimulus, paths) -> None:
        ring, n = self._ring, len(run)
        index = ring.acquire()
        try:
            self.writers.check()
            host = ring.view(index, n, self.plan.geometry)
            host.copy_(captured.blocks[row, :n], non_blocking=ring.pinned(index))
            landed = None
            if self.plan.device.type == "cuda":
                landed = torch.cuda.Event()
                landed.record(torch.cuda.current_stream(self.plan.device))
            self._write_events(run, paths)
            task = self.run_writer.block_task(host, captured.finite[row], run, paths, landed)
        except BaseException:
            ring.release(index)
            raise
        self.writers.submit(task, then=functools.partial(ring.release, index))

    def _write_events(self, run: RunStimulus, paths) -> None:
        table = run_events(
            run.token_ids,
            self.cells,
            run.conditions,
            run.special,
            spans=run.spans,
            words=run.words,
            stim_file=run.stim_file,
        )
        self._runs.append((Path(paths[0]), Path(paths[1])))
        write_events(Path(paths[1]), table)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes page-locked by the ring now (0 without one)."""
        return self._ring.pinned_bytes if self._ring is not None else 0

    def close(self, failed: bool = False) -> None:
        """Finish (or, after a failure, drop) queued writes; give every buffer back.

        Parameters
        ----------
        failed : bool, default=False
            The recording is ending on an error: queued writes are dropped and writer errors
            are not raised (the first error propagates).
        """
        with contextlib.ExitStack() as stack:
            for memory in self._memory:  # closed last, in reverse order, whatever happens
                stack.callback(memory.close)
            self._memory = []
            self._capture = None
            if failed:  # nothing of an unfinished run stays: its events go with its bold
                stack.callback(self._remove_unfinished)
            self.writers.close(cancel=failed)

    def _remove_unfinished(self) -> None:
        for bold, events in self._runs:
            if not bold.exists():
                events.unlink(missing_ok=True)
