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
#: What a masked neuron is replaced by: zero, or its mean over a calibration text.
FILLS = ("zero", "mean")
#: Hook points whose units can be masked.
MASKABLE = ("mlp", "mlp_out")


@contextlib.contextmanager
def mask_neurons(
    model: torch.nn.Module | LoadedModel,
    neurons: np.ndarray,
    mode: str = "ablate",
    means: np.ndarray | None = None,
    hook_point: str = "mlp",
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
    hook_point : {"mlp", "mlp_out"}, default="mlp"
        Where the set lives: the MLP neurons (the down projection's input) or the MLP
        output dimensions (its output, hidden-size wide; the units of arXiv 2502.20408).

    Notes
    -----
    One hook per affected layer multiplies the activations by a 0/1 vector (and adds
    ``means * (1 - mask)``), kept on the device and in the dtype where that layer runs:
    vectorised, in place (no allocation) unless autograd needs the input, and each hook is
    bound to its own layer's vector (``functools.partial`` at registration, never a closure
    over the loop variable: the published code's late-binding defect).
    """
    model = model.model if isinstance(model, LoadedModel) else model
    masked = check_mask(model, neurons, mode, hook_point)
    if means is not None and np.shape(means) != masked.shape:
        raise InputError(
            f"means have shape {np.shape(means)}, the neuron set {masked.shape}: compute them "
            "with neuron_means() for the same model and hook point."
        )
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
        # In place: the down projection's input (and output) is a fresh tensor that nothing
        # else reads, so masking it costs one pass over it and no allocation.
        x.mul_(on_device(multipliers, layer, x))
        if layer in offsets:
            x.add_(on_device(offsets, layer, x))
        return x

    with neuron_hooks(model, hook, layers, hook_point):
        yield


def check_mask(
    model: torch.nn.Module, neurons: np.ndarray, mode: str, hook_point: str = "mlp"
) -> np.ndarray:
    """Validate a neuron set against the model; return the neurons to mask.

    Parameters
    ----------
    model : torch.nn.Module
    neurons : ndarray of bool, shape (n_layers, n_neurons)
        The neuron set.
    mode : {"ablate", "keep"}
        ``"ablate"`` masks the set; ``"keep"`` masks every other neuron.
    hook_point : {"mlp", "mlp_out"}, default="mlp"
        Where the set lives.
    """
    _check_mode(mode)
    if hook_point not in MASKABLE:
        raise InputError(
            f"hook_point must be one of {MASKABLE} to mask neurons, got {hook_point!r}."
        )
    neurons = np.asarray(neurons, dtype=bool)
    widths = neurons_per_layer(model, hook_point)
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
def neuron_means(
    lm: LoadedModel, text: str, max_tokens: int = 512, hook_point: str = "mlp"
) -> np.ndarray:
    """Mean activation of every neuron over a calibration text, ``(n_layers, n_neurons)``.

    The text is read in windows of ``max_tokens`` tokens (each from a fresh context), and
    the mean is taken over all of its tokens.

    Parameters
    ----------
    %(lm)s
    text : str
        Calibration text whose tokens the means are taken over; never the evaluation text
        (see :func:`~llm2bids.evaluation.texts.check_disjoint`).
    max_tokens : int, default=512
        Tokens per window.
    hook_point : {"mlp", "mlp_out"}, default="mlp"
    """
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    if len(ids) == 0:
        raise InputError("the calibration text has no tokens; means need activations to average.")
    sums: dict[int, torch.Tensor] = {}

    def capture(layer, x):
        total = x.reshape(-1, x.shape[-1]).double().sum(0)
        sums[layer] = sums[layer] + total if layer in sums else total

    with torch.inference_mode(), neuron_hooks(lm.model, capture, hook_point=hook_point):
        for start in range(0, len(ids), max_tokens):
            lm.model(ids[None, start : start + max_tokens].to(lm.device))
    return np.stack([(sums[i] / len(ids)).float().cpu().numpy() for i in sorted(sums)])


def protect_layers(neurons: np.ndarray, layers, mode: str) -> np.ndarray:
    """Leave whole layers untouched by a mask: kept whole (``keep``), never ablated (``ablate``).

    Parameters
    ----------
    neurons : ndarray of bool, shape (n_layers, n_neurons)
        The neuron set.
    layers : sequence of int
        Layers to protect; negative numbers count from the end (``-1``: the last layer).
        The pruning paper (arXiv 2508.05239) protects the first 3 and the last 2:
        ``[0, 1, 2, -2, -1]``.
    mode : {"ablate", "keep"}

    Returns
    -------
    ndarray of bool
        A copy of ``neurons`` with the protected layers all in (keep) or all out (ablate).
    """
    _check_mode(mode)
    out = np.array(neurons, dtype=bool)
    out[resolve_layers(layers, out.shape[0]), :] = mode == "keep"
    return out


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Layer numbers (negative from the end) as sorted 0-based indices, or a clear error."""
    resolved = set()
    for layer in layers or ():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise InputError(f"protected layers must be whole numbers, got {layer!r}.")
        if not -n_layers <= layer < n_layers:
            raise InputError(
                f"protected layer {layer} is out of range: the model has {n_layers} layers "
                f"(0 to {n_layers - 1}, or -1 to -{n_layers} from the end)."
            )
        resolved.add(int(layer) % n_layers)
    return sorted(resolved)
