"""Capturing one batch: the hooks' target, on the device or in host memory.

On an accelerator (a :class:`~.buffers.DeviceStage`), everything per token happens where the
activations are: the hook copies each layer's neurons into its z-slice of the batch's data
blocks on the device, casting to float32, and after the forward pass the finiteness of every
run is checked there. The recorder then copies run after run to the host
(:class:`~.pipeline.RecordingPipeline`).

On the CPU, the activations already are in host memory, and every pass over them costs the
cores the writers need. Nothing is laid out at capture: each layer's activations stay whole
(copied into a per-layer slab when small, kept as the model made them when large, see
:mod:`.buffers`), and the writers lay the block out in the file itself with gather writes,
checking each piece's finiteness just before writing it (see
:meth:`~llm2bids.bids.geometry.VoxelGeometry.block_pieces`). A kept model tensor that the
forward pass modified in place after the hook would be recorded wrong: the capture compares
each kept tensor's version counter after the forward pass and raises
:class:`ActivationsModified`, and the recorder computes that batch again with copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._docs import fill_doc
from .buffers import DeviceStage, LayerSlabs


@dataclass
class CapturedBatch:
    """A captured batch.

    Attributes
    ----------
    layers : list of torch.Tensor or None
        In host memory (CPU capture): each recorded layer's ``(batch, tokens, width)`` float32
        activations.
    blocks : torch.Tensor or None
        On the capture device (staged): ``(batch, tokens, n_layers, slice_size)`` float32;
        row ``i``'s run of ``n`` tokens is the contiguous ``blocks[i, :n]``.
    finite : list of bool or None
        Staged only: per row, whether every activation of its run is finite.
    """

    layers: list[torch.Tensor] | None = None
    blocks: torch.Tensor | None = None
    finite: list[bool] | None = None

    def run_layers(self, row: int, n_tokens: int) -> list[np.ndarray]:
        """Row ``row``'s first ``n_tokens`` tokens as one ``(n_tokens, width)`` array per layer
        (CPU capture; the arrays are views)."""
        return [layer[row, :n_tokens].numpy() for layer in self.layers]


class ActivationsModified(RuntimeError):
    """The forward pass modified a kept activation tensor in place after the hook saw it."""


class BatchCapture:
    """Hook target that takes each recorded layer's activations for the current batch.

    Parameters
    ----------
    layers : sequence of int
        The recorded layers; layer ``layers[z]`` goes to z-slice ``z``.
    n_neurons : int
        Width of each recorded layer.
    stage : DeviceStage or None, default=None
        Stage on the capture device: activations are laid out there.
    slabs : LayerSlabs or None, default=None
        Without a stage: host slabs small layers are copied into (``None``: kept as they are).
    """

    def __init__(
        self,
        layers: Sequence[int],
        n_neurons: int,
        stage: DeviceStage | None = None,
        slabs: LayerSlabs | None = None,
    ):
        self.z_of = {layer: z for z, layer in enumerate(layers)}
        self.n_neurons = n_neurons
        self.stage = stage
        self.slabs = slabs
        self.copy = False  # on the CPU: copy every layer (after ActivationsModified)
        self._target: torch.Tensor | None = None
        self._kept: list = []
        self._slab_layers: list[torch.Tensor] | None = None
        self._shape = (0, 0)

    @fill_doc
    def start(self, slot: int, batch: int, tokens: int) -> None:
        """Begin a batch of ``batch`` rows of ``tokens`` tokens (CPU: in host slot ``slot``).

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
        self._shape = (batch, tokens)
        self._kept = [None] * len(self.z_of)
        if self.stage is not None:
            self._target = self.stage.data[:batch, :tokens]
        elif self.slabs is not None:
            self._slab_layers = self.slabs.layers(slot, batch, tokens)

    def __call__(self, layer: int, x: torch.Tensor) -> None:
        """Take ``x`` (``(batch, tokens, n_neurons)``, any dtype and device) for its slice."""
        x = x.view(*self._shape, -1)  # OPT flattens (batch, tokens)
        z = self.z_of[layer]
        if self._target is not None:  # staged: laid out (and cast) where it was computed
            self._target[:, :, z, : self.n_neurons].copy_(x, non_blocking=True)
            return
        if self._slab_layers is not None:  # small: copied (and cast) into the slab
            self._kept[z] = (self._slab_layers[z].copy_(x), None, 0)
            return
        kept = x.to(torch.float32).contiguous()
        if kept.data_ptr() != x.data_ptr():
            self._kept[z] = (kept, None, 0)
        elif self.copy or x.is_inference():  # no version counter to check
            self._kept[z] = (kept.clone(), None, 0)
        else:  # the model's own tensor: remember its version to detect later changes
            self._kept[z] = (kept, x, x._version)

    def finish(self, lengths: Sequence[int]) -> CapturedBatch:
        """The captured batch; staged, each run's finiteness is checked on the device.

        Parameters
        ----------
        lengths : sequence of int
            Tokens of each row's run (right padding past it is neither checked nor written).
        """
        if self._target is not None:
            blocks, self._target = self._target, None
            return CapturedBatch(blocks=blocks, finite=_finite_runs(blocks, lengths))
        kept, self._kept = self._kept, []
        if any(source is not None and source._version != v for _, source, v in kept):
            raise ActivationsModified(
                "the forward pass modified the hooked activations in place after the hook"
            )
        return CapturedBatch(layers=[k for k, _, _ in kept])


def _finite_runs(blocks: torch.Tensor, lengths: Sequence[int]) -> list[bool]:
    """Whether each run is all finite: one sum per run (NaN and Inf propagate into it).

    A sum that overflows although every value is finite falls back to an element-wise check
    of that run, so the answer is exact either way.
    """
    sums = torch.stack([blocks[i, :n].sum() for i, n in enumerate(lengths)])
    finite = torch.isfinite(sums).tolist()  # one synchronisation per batch
    for i, ok in enumerate(finite):
        if not ok:
            finite[i] = bool(torch.isfinite(blocks[i, : lengths[i]]).all())
    return finite
