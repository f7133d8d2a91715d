"""Masking neurons at inference: lesion a set, or keep only it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch

from .._docs import fill_doc
from ..exceptions import InputError, check_choice
from ..models import LoadedModel, arch_spec, neuron_hooks
from ..models.hooks import layer_count, neurons_per_layer

MODES = ("ablate", "keep")
#: What a masked neuron is replaced by: zero, or its mean over a calibration text.
FILLS = ("zero", "mean")
#: Hook points whose units can be masked.
MASKABLE = ("mlp", "mlp_out")


#: How a mask is applied: folded into the down projections' weights, or by a hook.
METHODS = ("auto", "weights", "hook")


@contextlib.contextmanager
def mask_neurons(
    model: torch.nn.Module | LoadedModel,
    neurons: np.ndarray,
    mode: str = "ablate",
    means: np.ndarray | None = None,
    hook_point: str = "mlp",
    method: str = "auto",
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
    method : {"auto", "weights", "hook"}, default="auto"
        ``"weights"`` folds a zero mask into the down projections: the masked neurons' columns
        (``mlp``) or the masked dimensions' rows and biases (``mlp_out``) are zeroed for the
        duration of the context and restored exactly on exit, also on error. That is exactly
        the masked computation (a zeroed input contributes exactly nothing) and costs nothing
        per forward pass. ``"hook"`` multiplies the activations by a 0/1 vector in every
        forward pass. ``"auto"`` folds when it can: a zero fill (``means=None``) on plain
        floating-point weights that are in memory; it hooks for a mean fill and where weights
        are offloaded (accelerate's ``"cpu"``/``"disk"`` map entries), quantised, or of a
        module type it does not know.

    Notes
    -----
    Folded, a forward pass run with gradients enabled on weights that require them also masks
    the activations (a hook that does nothing otherwise), so the masked neurons' weights get
    no gradient, as with the hook. Folding changes the model for everyone using it during the
    context (another thread's forward passes, too).

    The hook is kept on the device and in the dtype where each layer runs: vectorised, in
    place (no allocation) unless autograd needs the input, and each hook is bound to its own
    layer's vector (``functools.partial`` at registration, never a closure over the loop
    variable: the published code's late-binding defect).
    """
    model = model.model if isinstance(model, LoadedModel) else model
    check_choice("method", method, METHODS)
    masked = check_mask(model, neurons, mode, hook_point)
    if means is not None and np.shape(means) != masked.shape:
        raise InputError(
            f"means have shape {np.shape(means)}, the neuron set {masked.shape}: compute them "
            "with neuron_means() for the same model and hook point."
        )
    layers = [layer for layer in range(masked.shape[0]) if masked[layer].any()]
    why_not = _why_not_foldable(model, layers, means)
    if method == "weights" and why_not:
        raise InputError(f"method='weights' cannot fold this mask: {why_not}; use method='hook'.")
    if method == "hook" or why_not:
        with _hooked_mask(model, masked, layers, means, hook_point):
            yield
    else:
        with _folded_mask(model, masked, layers, hook_point):
            yield


def _hooked_mask(model, masked, layers, means, hook_point):
    """The mask as a hook on each affected layer (see :func:`mask_neurons`)."""
    multipliers = {layer: torch.as_tensor(~masked[layer]) for layer in layers}
    offsets = {}
    if means is not None:
        offsets = {
            layer: torch.as_tensor(np.where(masked[layer], means[layer], 0.0)) for layer in layers
        }

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # autograd needs x as it was
            out = x * _on_device(multipliers, layer, x)
            return out + _on_device(offsets, layer, x) if layer in offsets else out
        # In place: the down projection's input (and output) is a fresh tensor that nothing
        # else reads, so masking it costs one pass over it and no allocation.
        x.mul_(_on_device(multipliers, layer, x))
        if layer in offsets:
            x.add_(_on_device(offsets, layer, x))
        return x

    return neuron_hooks(model, hook, layers, hook_point)


def _on_device(table: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """``table[layer]`` on ``x``'s device and dtype, moved once: layers of a device_map model
    live on several devices, and offloaded ones only come to one at forward time."""
    vector = table[layer]
    if vector.device != x.device or vector.dtype != x.dtype:
        with torch.inference_mode(False):  # a plain tensor, usable outside inference mode
            vector = table[layer] = vector.to(x.device, x.dtype)
    return vector


def _why_not_foldable(model: torch.nn.Module, layers: list[int], means) -> str | None:
    """Why a mask cannot be folded into the weights (``None`` when it can)."""
    if means is not None:
        return "a mean fill is not a zero in the weights"
    device_map = getattr(model, "hf_device_map", None) or {}
    if any(where in ("cpu", "disk") for where in device_map.values()):
        return "weights are offloaded (accelerate reloads them for every forward pass)"
    spec = arch_spec(model)
    for layer in layers:
        down = spec.down_module(model, layer)
        weight = getattr(down, "weight", None)
        if not isinstance(down, torch.nn.Linear) and type(down).__name__ != "Conv1D":
            return f"layer {layer}'s down projection is a {type(down).__name__}"
        if type(weight) is not torch.nn.Parameter:  # quantised weights are subclasses
            return f"layer {layer}'s weight is a {type(weight).__name__} (quantised?)"
        if not weight.dtype.is_floating_point or weight.device.type == "meta":
            return f"layer {layer}'s weight is {weight.dtype} on {weight.device}"
        if getattr(getattr(down, "_hf_hook", None), "offload", False):
            return f"layer {layer} is offloaded"
    return None


@contextlib.contextmanager
def _folded_mask(model, masked, layers, hook_point):
    """Zero the masked inputs (``mlp``) or outputs (``mlp_out``) of the down projections."""
    spec = arch_spec(model)
    folded = []  # (module, weight dim, index, saved weight slice, saved bias slice)
    handles = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for layer in layers:
                down = spec.down_module(model, layer)
                weight = down.weight
                index = torch.from_numpy(np.flatnonzero(masked[layer])).to(weight.device)
                # nn.Linear is (out, in), transformers' Conv1D (in, out)
                on_input = hook_point == "mlp"
                dim = int(on_input) if not spec.conv1d else int(not on_input)
                keep_at = "cpu" if weight.device.type == "cuda" else weight.device
                saved_w = weight.index_select(dim, index).to(keep_at)
                bias = None if on_input else getattr(down, "bias", None)
                saved_b = None if bias is None else bias.index_select(0, index).to(keep_at)
                folded.append((down, dim, index, saved_w, saved_b))
                weight.index_fill_(dim, index, 0)
                if bias is not None:
                    bias.index_fill_(0, index, 0)
        handles = _gradient_guards(model, masked, layers, hook_point)
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.inference_mode(False), torch.no_grad():
            for down, dim, index, saved_w, saved_b in reversed(folded):
                down.weight.index_copy_(dim, index, saved_w.to(down.weight.device))
                if saved_b is not None:
                    down.bias.index_copy_(0, index, saved_b.to(down.bias.device))


def _gradient_guards(model, masked, layers, hook_point) -> list:
    """Hooks that also mask the activations, only in forward passes that build a graph for
    weights requiring gradients (so the masked weights get none); a no-op otherwise."""
    spec = arch_spec(model)
    multipliers = {layer: torch.as_tensor(~masked[layer]) for layer in layers}
    handles = []
    for layer in layers:
        down = spec.down_module(model, layer)

        def guard(layer, x: torch.Tensor, down=down):
            if torch.is_grad_enabled() and down.weight.requires_grad:
                return x * _on_device(multipliers, layer, x)
            return None

        handles.append(_register(down, hook_point, functools.partial(guard, layer)))
    return handles


def _register(module, hook_point, fn):
    if hook_point == "mlp":
        return module.register_forward_pre_hook(lambda m, args: _replace_first(args, fn(args[0])))
    return module.register_forward_hook(lambda m, args, out: fn(out))


def _replace_first(args, x):
    return None if x is None else (x, *args[1:])


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
    check_choice("mode", mode, MODES)


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
