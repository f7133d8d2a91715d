"""Capturing one batch: hooked activations, laid out as NIfTI data, checked, copied to the host.

On an accelerator, everything per token happens where the activations are: the hook copies
each layer's neurons into its z-slice of the batch's data block on the device, casting to
float32; after the forward pass the finiteness of every run is checked there, and the batch
goes to the host in one copy. The host then only writes.

On the CPU, the activations already are in host memory, and every pass over them costs the
cores the writers need. Nothing is laid out at capture: each layer's activations stay whole
(copied into a per-layer slab of the recording's memory when small, kept as the model made
them when large, see :class:`~.buffers.ActivationBuffers`), and the writers lay the block out
in the file itself with gather writes, checking each piece's finiteness just before writing
it (see :meth:`~llm2bids.bids.geometry.VoxelGeometry.block_pieces`). A kept model tensor that
the forward pass modified in place after the hook would be recorded wrong: the capture
compares each kept tensor's version counter after the forward pass and raises
:class:`ActivationsModified`, and the recorder computes that batch again with copies.

The same path is fed by the model's hooks in :func:`~llm2bids.recording.record` and by ready
tensors in the benchmark of the host pipeline (``benchmarks/run.py --only pipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._docs import fill_doc
from .buffers import ActivationBuffers


@dataclass
class CapturedBatch:
    """A captured batch on its way to the host.

    Attributes
    ----------
    host : torch.Tensor or None
        ``(batch, tokens, n_layers, slice_size)`` float32 in a host slot; run ``i`` of ``n``
        tokens is ``host[i, :n]``. Valid once :meth:`wait` returns. ``None`` on the CPU.
    finite : list of bool or None
        Per run: every activation of the run is finite (checked where it was captured).
        ``None`` on the CPU, where the writers check while writing.
    layers : list of torch.Tensor or None
        On the CPU: each recorded layer's ``(batch, tokens, width)`` float32 activations.
    """

    host: torch.Tensor | None
    finite: list[bool] | None
    layers: list[torch.Tensor] | None = None
    _copied: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Block until the device-to-host copy has landed (no-op on the CPU)."""
        if self._copied is not None:
            self._copied.synchronize()

    def run_layers(self, row: int, n_tokens: int) -> list[np.ndarray]:
        """Row ``row``'s first ``n_tokens`` tokens as one ``(n_tokens, width)`` array per layer.

        Only for a batch captured on the CPU (``layers`` set); the arrays are views.
        """
        return [layer[row, :n_tokens].numpy() for layer in self.layers]


class ActivationsModified(RuntimeError):
    """The forward pass modified a kept activation tensor in place after the hook saw it."""


class BatchCapture:
    """Hook target that writes each layer's activations into the batch's data block.

    Parameters
    ----------
    buffers : ActivationBuffers
        The recording's memory.
    layers : sequence of int
        The recorded layers; layer ``layers[z]`` goes to z-slice ``z``.
    """

    def __init__(self, buffers: ActivationBuffers, layers: Sequence[int]):
        self.buffers = buffers
        self.z_of = {layer: z for z, layer in enumerate(layers)}
        self.n_neurons = buffers.geometry.n_neurons
        self.copy = False  # on the CPU: copy every layer (after ActivationsModified)
        self._target: torch.Tensor | None = None
        self._kept: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self._slabs: list[torch.Tensor] | None = None
        self._shape = (0, 0)
        self._slot = 0

    @property
    def on_host(self) -> bool:
        """Whether activations arrive in host memory (kept, not copied into a data block)."""
        return self.buffers.stage is None

    @fill_doc
    def start(self, slot: int, batch: int, tokens: int) -> None:
        """Begin a batch of ``batch`` rows of ``tokens`` tokens in host slot ``slot``.

        Parameters
        ----------
        %(slot)s
        %(batch_tokens)s
        """
        self._slot = slot
        self._shape = (batch, tokens)
        self._kept = [None] * len(self.z_of)
        if self.on_host:
            keep = self.buffers.keeps_model_tensors
            self._slabs = None if keep else self.buffers.layer_slabs(slot, batch, tokens)
            return
        self._target = self.buffers.capture_target(slot, batch, tokens)
        if self.buffers.geometry.slice_size > self.n_neurons:
            # the stage is reused with other shapes: padding voxels must be zero again
            self._target[..., self.n_neurons :] = 0

    def __call__(self, layer: int, x: torch.Tensor) -> None:
        """Take ``x`` (``(batch, tokens, n_neurons)``, any dtype and device) for its slice."""
        x = x.view(*self._shape, -1)  # OPT flattens (batch, tokens)
        if self.on_host:
            z = self.z_of[layer]
            if self._slabs is not None:  # small: copied (and cast) into the recording's slab
                self._kept[z] = (self._slabs[z].copy_(x), None, 0)
                return
            kept = x.to(torch.float32).contiguous()
            if kept.data_ptr() != x.data_ptr():
                self._kept[z] = (kept, None, 0)
            elif self.copy or x.is_inference():  # no version counter to check
                self._kept[z] = (kept.clone(), None, 0)
            else:  # the model's own tensor: remember its version to detect later changes
                self._kept[z] = (kept, x, x._version)
            return
        self._target[:, :, self.z_of[layer], : self.n_neurons].copy_(x, non_blocking=True)

    def finish(self, lengths: Sequence[int]) -> CapturedBatch:
        """Check each run's values and start the copy to the host; returns the batch.

        Parameters
        ----------
        lengths : sequence of int
            Tokens of each row's run (right padding past it is neither checked nor written).
        """
        if self.on_host:
            kept, self._kept = self._kept, []
            if any(source is not None and source._version != v for _, source, v in kept):
                raise ActivationsModified(
                    "the forward pass modified the hooked activations in place after the hook"
                )
            return CapturedBatch(None, None, [k for k, _, _ in kept])
        target, self._target = self._target, None
        finite = _finite_runs(target, lengths)
        host = self.buffers.host(self._slot, target.shape[0], target.shape[1])
        copied = None
        if self.buffers.stage is not None:
            host.copy_(target, non_blocking=self.buffers.pinned)
            if target.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record(torch.cuda.current_stream(target.device))
        return CapturedBatch(host, finite, _copied=copied)


def _finite_runs(target: torch.Tensor, lengths: Sequence[int]) -> list[bool]:
    """Whether each run is all finite: one sum per run (NaN and Inf propagate into it).

    A sum that overflows although every value is finite falls back to an element-wise check
    of that run, so the answer is exact either way.
    """
    sums = torch.stack([target[i, :n].sum() for i, n in enumerate(lengths)])
    finite = torch.isfinite(sums).tolist()  # one synchronisation per batch
    for i, ok in enumerate(finite):
        if not ok:
            finite[i] = bool(torch.isfinite(target[i, : lengths[i]]).all())
    return finite
