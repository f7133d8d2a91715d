"""Memory for the activations of one recording: allocated once per ``record()`` call, reused.

Two ways activations travel, chosen by where the recorded layers run (see
:func:`~llm2bids.models.hooks.hook_device`):

- **On an accelerator** the hooks lay each layer into one :class:`DeviceStage` (a batch
  already in the NIfTI data layout, float32, padding zeroed once). Each run is then copied on
  its own into a buffer of a :class:`RunRing` on the host: a few run-sized buffers, page-locked
  for asynchronous copies, each released by its writer as soon as its file is written. Host
  memory is the ring, not whole batches.
- **On the CPU** the activations already are in host memory: each layer's batch is kept as
  the model computed it when it is large, or copied into a per-layer slab of one of at most
  two :class:`LayerSlabs` slots when it is small (kept small tensors would fragment glibc's
  heap); the writers lay the block out in the file with gather writes.

Host memory comes from private anonymous mappings (:func:`host_memory`), never from the heap:
asked for huge pages and faulted in by several threads at once (8 GB/s on a 2-core VM, against
2.5 GB/s for ``MAP_POPULATE``), unmapped when the recording ends. Views of it are numpy arrays,
which hold the mapping's buffer export: a mapping cannot be unmapped while a view of it is
alive (``torch.frombuffer`` gives no such guarantee).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._docs import fill_doc
from ..bids.geometry import VoxelGeometry

logger = logging.getLogger("llm2bids.recording")

SLOTS = 2  # CPU batches in host memory: one written while the next is captured
KEEP_ABOVE = 32 << 20  # bytes of one layer's batch from which CPU tensors are kept uncopied
RING_PER_WRITER = 2  # run buffers per writer thread: one being written, one landing
_HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and pages are touched
_FAULT_THREADS = 8


# -- host memory ---------------------------------------------------------------------------
def host_memory(nbytes: int, threads: int | None = None) -> mmap.mmap:
    """A private anonymous mapping of at least ``nbytes``, faulted in by several threads.

    Parameters
    ----------
    nbytes : int
        Bytes wanted (rounded up to a whole number of huge pages).
    threads : int or None, default=None
        Threads that fault the pages in; default: up to 8, at most one per core.

    Returns
    -------
    mmap.mmap
        Resident and zeroed. Transparent huge pages are asked for (``MADV_HUGEPAGE``), so a
        fault maps 2 MiB where the kernel allows it.
    """
    size = max(_HUGE_PAGE, -(-int(nbytes) // _HUGE_PAGE) * _HUGE_PAGE)
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no flags, no advice
        return mmap.mmap(-1, size)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    n = max(1, min(threads or _FAULT_THREADS, os.cpu_count() or 1, size // _HUGE_PAGE))
    step = -(-size // n // _HUGE_PAGE) * _HUGE_PAGE
    chunks = [(start, min(step, size - start)) for start in range(0, size, step)]
    if n == 1:
        for chunk in chunks:
            _fault_in(region, *chunk)
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="llm2bids-fault") as pool:
            list(pool.map(lambda chunk: _fault_in(region, *chunk), chunks))
    return region


def _fault_in(region: mmap.mmap, start: int, length: int) -> None:
    try:
        region.madvise(_MADV_POPULATE_WRITE, start, length)
    except (AttributeError, OSError):  # an older kernel: touch one byte per page
        pages = np.frombuffer(region, dtype=np.uint8, count=length, offset=start)
        pages[:: mmap.PAGESIZE] = 0
        del pages


def _float_view(region: mmap.mmap, count: int, offset: int = 0) -> np.ndarray:
    """``count`` float32 of ``region`` from byte ``offset``: a view that holds the mapping."""
    return np.frombuffer(region, dtype=np.float32, count=count, offset=offset)


def _unmap(regions: list[mmap.mmap]) -> None:
    for region in regions:
        try:
            region.close()
        except BufferError:  # a view is still referenced: unmapped when the last one goes
            logger.debug("a host buffer is still referenced; it is unmapped with its last view")


# -- CPU: per-layer slabs ------------------------------------------------------------------
class LayerSlabs:
    """Host slots that hold each recorded layer's batch contiguously (small CPU batches).

    Parameters
    ----------
    capacity : int
        Largest ``batch * tokens`` of the recording's batches.
    geometry : VoxelGeometry
    n_slots : int
        Slots (at most :data:`SLOTS`; one when the recording is a single batch).
    """

    def __init__(self, capacity: int, geometry: VoxelGeometry, n_slots: int):
        self.geometry = geometry
        self.count = int(capacity) * geometry.n_total
        self.nbytes = self.count * 4
        self._regions = [host_memory(self.nbytes) for _ in range(n_slots)]

    @fill_doc
    def layers(self, slot: int, batch: int, tokens: int) -> list[torch.Tensor]:
        """Slot ``slot`` as one contiguous ``(batch, tokens, n_neurons)`` tensor per layer.

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
        n = batch * tokens * self.geometry.n_neurons
        flat = torch.from_numpy(_float_view(self._regions[slot], self.count))
        return [
            flat[z * n : (z + 1) * n].view(batch, tokens, self.geometry.n_neurons)
            for z in range(self.geometry.n_layers)
        ]

    def close(self) -> None:
        """Unmap the slots (a slot still viewed is unmapped with its last view)."""
        regions, self._regions = self._regions, []
        _unmap(regions)


# -- accelerator: the device stage and the ring of run buffers -------------------------------
def _allocate_stage(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialised float32 memory for the stage (a seam for tests: real devices hand out
    whatever was there before)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


class DeviceStage:
    """One batch of activations on the capture device, laid out as NIfTI data blocks.

    Parameters
    ----------
    batch_size : int
        Rows of the largest batch.
    max_tokens : int
        Tokens of the longest run.
    geometry : VoxelGeometry
    device : torch.device

    Notes
    -----
    The stage has the fixed shape ``(batch_size, max_tokens, n_layers, slice_size)``; a batch
    of ``b`` rows of ``t`` tokens is written into ``[:b, :t]`` and row ``i``'s run of ``n``
    tokens, ``[i, :n]``, is contiguous: its data block. The padding voxels are zeroed once, at
    allocation, and never written after.
    """

    def __init__(self, batch_size: int, max_tokens: int, geometry: VoxelGeometry, device):
        self.geometry = geometry
        self.device = torch.device(device)
        shape = (batch_size, max_tokens, geometry.n_layers, geometry.slice_size)
        self.nbytes = int(np.prod(shape)) * 4
        self.data: torch.Tensor | None = _allocate_stage(shape, self.device)
        self.data[..., geometry.n_neurons :] = 0

    def close(self) -> None:
        """Free the stage and give the device memory it used back to the driver."""
        if self.data is None:
            return
        self.data = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # torch's caching allocator would keep the stage reserved: the next recording's
            # free-memory check would count it as used (other processes could not have it)
            torch.cuda.empty_cache()


class RunRing:
    """Run-sized host buffers that device copies land in and writers free again.

    Parameters
    ----------
    n_buffers : int
        Buffers in the ring.
    run_count : int
        float32 values of the largest run (``max_tokens * volume_size``).
    device : torch.device
        The capture device. For CUDA each buffer is page-locked (``cudaHostRegister``) so its
        copy runs asynchronously at the bus's speed.

    Notes
    -----
    The buffers are faulted in and page-locked by a background thread, buffer after buffer,
    while the first forward pass runs; :meth:`acquire` waits only for the buffer it hands out.
    A buffer that cannot be page-locked (no CUDA runtime binding, a memory-lock limit) is still
    used, with synchronous copies; the warning says so once.
    """

    def __init__(self, n_buffers: int, run_count: int, device):
        self.device = torch.device(device)
        self.n_buffers = int(n_buffers)
        self.run_count = int(run_count)
        self.buffer_bytes = -(-self.run_count * 4 // _HUGE_PAGE) * _HUGE_PAGE
        self.nbytes = self.n_buffers * self.buffer_bytes
        self._regions: list[mmap.mmap] = []
        self._arrays: list[np.ndarray | None] = [None] * self.n_buffers
        self._pinned = [False] * self.n_buffers
        self._ready = [threading.Event() for _ in range(self.n_buffers)]
        self._free: list[int] = list(range(self.n_buffers))
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._failure: BaseException | None = None
        self._register = self.device.type == "cuda"
        self._preparer = threading.Thread(target=self._prepare, name="llm2bids-ring", daemon=True)
        self._preparer.start()

    def _prepare(self) -> None:
        try:
            with torch.cuda.device(self.device) if self._register else contextlib.nullcontext():
                for i in range(self.n_buffers):
                    if self._cancel.is_set():
                        return
                    region = host_memory(self.buffer_bytes)
                    self._regions.append(region)
                    self._arrays[i] = _float_view(region, self.run_count)
                    if self._register:
                        self._pinned[i] = self._page_lock(self._arrays[i])
                        self._register = self._pinned[i]  # after one refusal, none is tried
                    self._ready[i].set()
        except BaseException as err:  # handed to acquire() in the recording's thread
            self._failure = err
        finally:
            for ready in self._ready:
                ready.set()

    def _page_lock(self, array: np.ndarray) -> bool:
        try:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(array.ctypes.data, array.nbytes, 1)  # portable
            code = int(getattr(err, "value", err))
            if code != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            return True
        except Exception as err:  # no cudart binding, or the system refuses to lock memory
            # a failed CUDA runtime call leaves its error set: the next kernel launch would
            # raise it, as if that kernel had failed
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaGetLastError()
            logger.warning(
                "could not page-lock host memory for device copies (%s); copies will be "
                "synchronous and slower.",
                err,
            )
            return False

    def wait_ready(self) -> None:
        """Block until every buffer is faulted in (and page-locked where it can be)."""
        self._preparer.join()
        if self._failure is not None:
            raise self._failure

    def acquire(self) -> int:
        """The index of a free buffer, ready for a copy; blocks until a writer frees one."""
        with self._cond:
            self._cond.wait_for(lambda: self._free)
            index = self._free.pop(0)
        self._ready[index].wait()
        if self._failure is not None:
            raise self._failure
        return index

    def release(self, index: int) -> None:
        """Give buffer ``index`` back once its contents are written."""
        with self._cond:
            self._free.append(index)
            self._cond.notify()

    @fill_doc
    def view(self, index: int, n_tokens: int, geometry: VoxelGeometry) -> torch.Tensor:
        """Buffer ``index`` as a ``(n_tokens, n_layers, slice_size)`` tensor (a run's block).

        Parameters
        ----------
        index : int
        n_tokens : int
        %(geometry)s
        """
        array = self._arrays[index][: n_tokens * geometry.volume_size]
        return torch.from_numpy(array).view(n_tokens, geometry.n_layers, geometry.slice_size)

    def pinned(self, index: int) -> bool:
        """Whether buffer ``index`` is page-locked (its copies can be asynchronous)."""
        return self._pinned[index]

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the ring that are page-locked now."""
        return sum(self.buffer_bytes for p in self._pinned if p)

    def close(self) -> None:
        """Stop preparing, unlock and unmap every buffer; safe to call more than once."""
        self._cancel.set()
        self._preparer.join()
        try:
            if any(self._pinned):
                torch.cuda.synchronize(self.device)  # no copy may still be landing
                cudart = torch.cuda.cudart()
                for i, pinned in enumerate(self._pinned):
                    if pinned:
                        with contextlib.suppress(Exception):
                            cudart.cudaHostUnregister(self._arrays[i].ctypes.data)
                        self._pinned[i] = False
        finally:
            self._arrays = [None] * self.n_buffers
            regions, self._regions = self._regions, []
            _unmap(regions)
