"""Capturing one batch: hooked activations, laid out as NIfTI data, checked, copied to the host.

Everything per token happens where the activations are (the GPU, when there is one): the hook
copies each layer's neurons into its z-slice of the batch's data block, casting to float32;
after the forward pass the finiteness of every run is checked there, and the batch goes to the
host in one copy. The host then only writes.

The same path is fed by the model's hooks in :func:`~llm2bids.recording.record` and by ready
tensors in the benchmark of the host pipeline (``benchmarks/run.py --only pipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .buffers import ActivationBuffers


@dataclass
class CapturedBatch:
    """A captured batch on its way to the host.

    Attributes
    ----------
    host : torch.Tensor
        ``(batch, tokens, n_layers, slice_size)`` float32 in a host slot; run ``i`` of ``n``
        tokens is ``host[i, :n]``. Valid once :meth:`wait` returns.
    finite : list of bool
        Per run: every activation of the run is finite (checked where it was captured).
    """

    host: torch.Tensor
    finite: list[bool]
    _copied: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Block until the device-to-host copy has landed (no-op on the CPU)."""
        if self._copied is not None:
            self._copied.synchronize()


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
        self._target: torch.Tensor | None = None
        self._slot = 0

    def start(self, slot: int, batch: int, tokens: int) -> None:
        """Begin a batch of ``batch`` rows of ``tokens`` tokens in host slot ``slot``."""
        self._slot = slot
        self._target = self.buffers.capture_target(slot, batch, tokens)
        if self.buffers.geometry.slice_size > self.n_neurons:
            # the slots are reused with other shapes: padding voxels must be zero again
            self._target[..., self.n_neurons :] = 0

    def __call__(self, layer: int, x: torch.Tensor) -> None:
        """Copy ``x`` (``(batch, tokens, n_neurons)``, any dtype and device) into its slice."""
        target = self._target
        x = x.view(target.shape[0], target.shape[1], -1)  # OPT flattens (batch, tokens)
        target[:, :, self.z_of[layer], : self.n_neurons].copy_(x, non_blocking=True)

    def finish(self, lengths: Sequence[int]) -> CapturedBatch:
        """Check each run's values and start the copy to the host; returns the batch.

        Parameters
        ----------
        lengths : sequence of int
            Tokens of each row's run (right padding past it is neither checked nor written).
        """
        target, self._target = self._target, None
        finite = _finite_runs(target, lengths)
        host = self.buffers.host(self._slot, target.shape[0], target.shape[1])
        copied = None
        if self.buffers.stage is not None:
            host.copy_(target, non_blocking=self.buffers.pinned)
            if target.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record(torch.cuda.current_stream(target.device))
        return CapturedBatch(host, finite, copied)


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
