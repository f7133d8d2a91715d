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
- On the CPU the slots hold each layer's activations one after the other (no layout, which
  the writers do), or nothing at all when the model's own tensors are large enough to keep
  (see :class:`ActivationBuffers`); two batches either way.
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

from .._docs import fill_doc
from ..bids.geometry import VoxelGeometry

logger = logging.getLogger("llm2bids.recording")

SLOTS = 2  # host batches: one written while the next is captured
KEEP_ABOVE = 32 << 20  # bytes of one layer's batch from which CPU tensors are kept uncopied


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
        staged there (laid out, cast to float32 and checked there) and copied to the host once,
        into one of two host slots.

    Notes
    -----
    Use as a context manager: everything is given back on exit, also on error.

    On the CPU the slots hold each layer's activations contiguously (the writers lay them out
    in the file), and only when one layer of a batch is smaller than ``KEEP_ABOVE`` (32 MiB).
    Larger tensors are kept as the model made them, with no copy: glibc serves blocks of 32
    MiB and more with their own mappings, which return to the system when freed. Smaller
    model tensors kept alive between batches land in the heap between the forward pass's
    temporaries and fragment it (measured: +200 MB peak for SmolLM2 at batch 4 x 128
    tokens), so those are copied into the slots, which cost the same two batches.
    """

    def __init__(self, capacity: int, geometry: VoxelGeometry, device: torch.device):
        self.geometry = geometry
        self.device = torch.device(device)
        self.capacity = int(capacity)
        self._maps: list[mmap.mmap] = []
        self._host: list[torch.Tensor] = []
        self._registered: list[int] = []
        self.stage: torch.Tensor | None = None
        self.keeps_model_tensors = False
        if self.device.type == "cpu":
            # the activations are in host memory already: large ones are kept as they are,
            # smaller ones are copied into per-layer slabs of the slots (see the Notes)
            self.keeps_model_tensors = self.capacity * geometry.n_neurons * 4 >= KEEP_ABOVE
            count = 0 if self.keeps_model_tensors else self.capacity * geometry.n_total
        else:
            count = self.capacity * geometry.volume_size
        self.nbytes = max(count, 1) * 4
        if count == 0:
            return
        self._maps = [_anonymous_map(self.nbytes) for _ in range(SLOTS)]
        self._host = [torch.frombuffer(m, dtype=torch.float32, count=count) for m in self._maps]
        if self.device.type == "cpu":
            return
        self.stage = torch.empty(count, dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            self._register()

    # -- views -----------------------------------------------------------------------------
    @fill_doc
    def host(self, slot: int, batch: int, tokens: int) -> torch.Tensor:
        """Slot ``slot`` as a contiguous ``(batch, tokens, n_layers, slice_size)`` tensor.

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
        return self._view(self._host[slot], batch, tokens)

    @fill_doc
    def layer_slabs(self, slot: int, batch: int, tokens: int) -> list[torch.Tensor]:
        """Slot ``slot`` as one contiguous ``(batch, tokens, n_neurons)`` tensor per layer (CPU).

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
        n = batch * tokens * self.geometry.n_neurons
        flat = self._host[slot]
        return [
            flat[z * n : (z + 1) * n].view(batch, tokens, self.geometry.n_neurons)
            for z in range(self.geometry.n_layers)
        ]

    @fill_doc
    def capture_target(self, slot: int, batch: int, tokens: int) -> torch.Tensor:
        """Where the hooks write: the device stage.

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
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
