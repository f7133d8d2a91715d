"""Memory for the activations of one recording: allocated once, reused batch after batch.

A recording holds two batches of activations on the host (one being written while the next
is captured) and, when the model runs on an accelerator, one batch on the device. Every
buffer is laid out as the NIfTI data block: a batch of ``b`` runs of at most ``t`` tokens is a
C-ordered ``(b, t, n_layers, slice_size)`` float32 array, so run ``i`` of ``n`` tokens is the
contiguous ``[i, :n]`` and is written to its file as it is (see :mod:`..bids.geometry`).

- The host slots are private anonymous memory mappings, not heap blocks: nothing of a batch
  is left in the allocator's heap (long-lived blocks there fragmented glibc's heap by up to
  0.8 batch per recording), and they are unmapped when the recording ends.
- With CUDA, the host slots are page-locked once (``cudaHostRegister``), so the single
  device-to-host copy per batch runs at the bus's speed and asynchronously; they are
  unregistered at the end. torch's pinned-memory cache is not used: it keeps one block per
  batch shape alive after the recording.
- On the CPU, the model's hooks write into a host slot directly (no device copy).
- Both slots are faulted in when they are mapped (``MAP_POPULATE``), in the kernel, at about
  ten times the speed of first touches from the forward pass; and they stay resident until the
  recording ends. Handing each written run's pages back (as an earlier version did) made every
  batch fault its memory in again, which cost more than writing it. So the host memory of a
  recording is the model plus two batches from its first batch on, whatever the number of runs:
  a short pilot recording shows what a long one needs.
"""

from __future__ import annotations

import logging
import mmap

import torch

from ..bids.geometry import VoxelGeometry

logger = logging.getLogger("llm2bids.recording")

SLOTS = 2  # host batches: one written while the next is captured


class ActivationBuffers:
    """The host slots (and the device stage) of one recording.

    Parameters
    ----------
    capacity : int
        Largest ``batch * tokens`` of the recording's batches.
    geometry : VoxelGeometry
        The recorded layers and their width.
    device : torch.device
        Where the hooked activations arrive. For a device other than the CPU, one batch is
        staged there (laid out, cast to float32 and checked there) and copied to the host once.

    Notes
    -----
    Use as a context manager: everything is given back on exit, also on error.
    """

    def __init__(self, capacity: int, geometry: VoxelGeometry, device: torch.device):
        self.geometry = geometry
        self.device = torch.device(device)
        count = max(int(capacity) * geometry.volume_size, 1)
        self.nbytes = count * 4
        self._maps = [_anonymous_map(self.nbytes) for _ in range(SLOTS)]
        self._host = [torch.frombuffer(m, dtype=torch.float32, count=count) for m in self._maps]
        self._registered: list[int] = []
        self.stage: torch.Tensor | None = None
        if self.device.type != "cpu":
            self.stage = torch.empty(count, dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            self._register()

    # -- views -----------------------------------------------------------------------------
    def host(self, slot: int, batch: int, tokens: int) -> torch.Tensor:
        """Slot ``slot`` as a contiguous ``(batch, tokens, n_layers, slice_size)`` tensor."""
        return self._view(self._host[slot], batch, tokens)

    def capture_target(self, slot: int, batch: int, tokens: int) -> torch.Tensor:
        """Where the hooks write: the device stage, or the host slot itself on the CPU."""
        if self.stage is None:
            return self.host(slot, batch, tokens)
        return self._view(self.stage, batch, tokens)

    def _view(self, flat: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        n = batch * tokens * self.geometry.volume_size
        return flat[:n].view(batch, tokens, self.geometry.n_layers, self.geometry.slice_size)

    @property
    def pinned(self) -> bool:
        """Whether the host slots are page-locked for asynchronous device copies."""
        return bool(self._registered)

    # -- page-locking ----------------------------------------------------------------------
    def _register(self) -> None:
        try:
            cudart = torch.cuda.cudart()
            for flat in self._host:
                err = cudart.cudaHostRegister(flat.data_ptr(), self.nbytes, 0)
                if int(getattr(err, "value", err)) != 0:
                    raise RuntimeError(f"cudaHostRegister returned {err}")
                self._registered.append(flat.data_ptr())
        except Exception as err:  # no cudart binding, or the system refuses to lock memory
            logger.warning(
                "could not page-lock %.1f GB of host memory for device copies (%s); copies "
                "will be synchronous and slower.",
                SLOTS * self.nbytes / 1e9,
                err,
            )
            self._unregister()

    def _unregister(self) -> None:
        if self._registered:
            torch.cuda.synchronize(self.device)  # no copy may still be landing in them
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []

    def close(self) -> None:
        """Unregister and unmap the host slots and free the device stage."""
        self._unregister()
        self.stage = None
        self._host = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view is still referenced: unmapped when it is collected
                logger.debug("a host slot is still referenced; it is freed with its last view")
        self._maps = []

    def __enter__(self) -> ActivationBuffers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _anonymous_map(size: int) -> mmap.mmap:
    if hasattr(mmap, "MAP_PRIVATE"):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(-1, size, flags=flags)
    return mmap.mmap(-1, size)  # Windows
