"""Masking neurons at inference: lesion a set, or keep only it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .._docs import fill_doc
from ..exceptions import InputError
from ..models import LoadedModel, neuron_hooks
from ..models.hooks import layer_count, neurons_per_layer

MODES = ("ablate", "keep")


@contextlib.contextmanager
def mask_neurons(
    model: torch.nn.Module | LoadedModel,
    neurons: np.ndarray,
    mode: str = "ablate",
    means: np.ndarray | None = None,
) -> Iterator[None]:
    """Zero (or mean-replace) neurons during every forward pass, ``generate`` included.

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
    neurons : ndarray of bool, shape (n_layers, n_neurons)
        The set.
    mode : {"ablate", "keep"}, default="ablate"
        ``"ablate"`` masks the set; ``"keep"`` masks every neuron outside it.
    means : ndarray of shape (n_layers, n_neurons) or None, default=None
        Replace masked neurons by these values (see :func:`neuron_means`) instead of zero.

    Notes
    -----
    One pre-hook per affected layer multiplies the down projection's input by a 0/1 vector
    (and adds ``means * (1 - mask)``), kept on the device and in the dtype where that layer
    runs: vectorised, in place (no allocation) unless autograd needs the input, and each hook
    is bound to its own layer's vector.
    """
    model = model.model if isinstance(model, LoadedModel) else model
    masked = check_mask(model, neurons, mode)
    multipliers, offsets, layers = {}, {}, []
    for layer in range(masked.shape[0]):
        if not masked[layer].any():
            continue
        layers.append(layer)
        multipliers[layer] = torch.as_tensor(~masked[layer])
        if means is not None:
            offsets[layer] = torch.as_tensor(np.where(masked[layer], means[layer], 0.0))

    def on_device(table: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
        # moved once, to wherever this layer runs (layers of a device_map model live on
        # several devices, and offloaded ones only come to one at forward time)
        vector = table[layer]
        if vector.device != x.device or vector.dtype != x.dtype:
            with torch.inference_mode(False):  # a plain tensor, usable outside inference mode
                vector = table[layer] = vector.to(x.device, x.dtype)
        return vector

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # autograd needs x as it was
            out = x * on_device(multipliers, layer, x)
            return out + on_device(offsets, layer, x) if layer in offsets else out
        # In place: the down projection's input is a fresh tensor that nothing else reads,
        # so masking it costs one pass over it and no allocation.
        x.mul_(on_device(multipliers, layer, x))
        if layer in offsets:
            x.add_(on_device(offsets, layer, x))
        return x

    with neuron_hooks(model, hook, layers):
        yield


def check_mask(model: torch.nn.Module, neurons: np.ndarray, mode: str) -> np.ndarray:
    """Validate a neuron set against the model; return the neurons to mask.

    Parameters
    ----------
    model : torch.nn.Module
    neurons : ndarray of bool, shape (n_layers, n_neurons)
        The neuron set.
    mode : {"ablate", "keep"}
        ``"ablate"`` masks the set; ``"keep"`` masks every other neuron.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
    neurons = np.asarray(neurons, dtype=bool)
    widths = neurons_per_layer(model)
    expected = (layer_count(model), widths[0])
    if neurons.shape != expected or len(set(widths)) != 1:
        raise InputError(
            f"the neuron set has shape {neurons.shape} (layers x neurons), the model "
            f"{expected}: it comes from a different model."
        )
    if mode == "ablate" and not neurons.any():
        raise InputError("the neuron set is empty: there is nothing to ablate.")
    if mode == "keep" and not neurons.any():
        raise InputError("keep mode with an empty set would mask every neuron; nothing is kept.")
    return neurons if mode == "ablate" else ~neurons


@fill_doc
def neuron_means(lm: LoadedModel, text: str, max_tokens: int = 512) -> np.ndarray:
    """Mean activation of every neuron over a calibration text, ``(n_layers, n_neurons)``.

    Parameters
    ----------
    %(lm)s
    text : str
        Text whose tokens the means are taken over.
    max_tokens : int, default=1024
    """
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(lm.device)
    sums: dict[int, torch.Tensor] = {}

    def capture(layer, x):
        sums[layer] = x.reshape(-1, x.shape[-1]).float().mean(0)

    with torch.inference_mode(), neuron_hooks(lm.model, capture):
        lm.model(ids)
    return np.stack([sums[i].cpu().numpy() for i in sorted(sums)])
