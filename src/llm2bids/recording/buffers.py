"""The activations of one forward batch, in memory that is handed back run by run.

A batch's activations are the largest thing a recording holds (4 runs x 512 tokens of
SmolLM2: 377 MB). They live in one anonymous memory mapping per batch, not in the heap:

- nothing is left behind in the allocator's heap between batches (keeping the model's own
  per-layer tensors fragmented glibc's heap by up to 0.8 batch per recording);
- pages are touched in order as layers arrive, so the mapping grows with the forward pass;
- each run's pages are handed back to the system as soon as that run is written
  (:meth:`BatchActivations.release`), so the batch being written shrinks while the next one
  fills, and the peak stays about one batch as long as the writer keeps up on average.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch


class BatchActivations:
    """``(batch, n_layers, tokens, n_neurons)`` float32 activations in their own mapping.

    Parameters
    ----------
    shape : tuple of int
        ``(batch, n_layers, tokens, n_neurons)``.
    """

    def __init__(self, shape: tuple[int, int, int, int]):
        count = int(np.prod(shape))
        size = max(count * 4, 1)
        if hasattr(mmap, "MAP_PRIVATE"):  # private: released pages are freed, not kept shared
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:  # Windows
            self._map = mmap.mmap(-1, size)
        self.array = np.frombuffer(self._map, np.float32, count=count).reshape(shape)

    def tensor(self) -> torch.Tensor:
        """The same memory as a torch tensor (for in-place copies from the model)."""
        return torch.from_numpy(self.array)

    def release(self, row: int) -> None:
        """Hand the pages of run ``row`` back to the system; its values are gone afterwards.

        Only whole pages inside the run's rows are released (a page shared with a neighbouring
        run stays). Where the platform has no ``madvise`` this does nothing, and the memory is
        returned when the batch is dropped.
        """
        if not (hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED")):
            return
        size = self.array[0].nbytes
        start = -(-row * size // mmap.PAGESIZE) * mmap.PAGESIZE  # round up
        stop = (row + 1) * size // mmap.PAGESIZE * mmap.PAGESIZE  # round down
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
