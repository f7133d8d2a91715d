"""Forward hooks on the neuron hook point, always removed, each bound to its own layer.

The reference implementation bound the layer index late (a closure over a loop variable), so
every hook saw the last layer's index. Here each hook is a ``functools.partial`` with its layer
fixed at registration, and hooks live only inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch

from ..bids.names import acquisition_label
from ..exceptions import InputError
from .registry import arch_spec

HOOK_POINTS = ("mlp", "mlp_out", "resid")
#: What each hook point records (written into the sidecars and the report's methods).
HOOK_POINT_DESCRIPTIONS = {
    "mlp": "MLP neurons: input of the down projection (after the activation and gate product)",
    "mlp_out": "MLP output: output of the down projection (hidden-size dimensions), the hook "
    "point of arXiv 2502.20408",
    "resid": "residual stream: output of each transformer block",
}


def hook_point_of(acquisition: str | None) -> str | None:
    """The hook point an ``acq-`` label names (``None`` when it names none)."""
    return next((h for h in HOOK_POINTS if acquisition_label(h) == acquisition), None)


def check_hook_point(hook_point: str) -> None:
    """Refuse a hook point that does not exist, naming those that do."""
    if hook_point not in HOOK_POINTS:
        raise InputError(f"hook_point must be one of {HOOK_POINTS}, got {hook_point!r}.")


@contextlib.contextmanager
def neuron_hooks(
    model: torch.nn.Module,
    fn: Callable[[int, torch.Tensor], torch.Tensor | None],
    layers: Sequence[int] | None = None,
    hook_point: str = "mlp",
) -> Iterator[None]:
    """Call ``fn(layer, activations)`` at the hook point of each layer during forward passes.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM of a registered architecture.
    fn : callable
        ``fn(layer, activations)`` with activations of shape ``(batch, tokens, neurons)``.
        A returned tensor replaces the activations (used for masking); ``None`` leaves them.
    layers : sequence of int or None, default=None
        Layers to hook; ``None`` hooks all.
    hook_point : {"mlp", "mlp_out", "resid"}, default="mlp"
        ``"mlp"``: the input of the down projection (the MLP neurons). ``"mlp_out"``: the
        output of the down projection (hidden-size dimensions, before any bias-free residual
        add). ``"resid"``: the output of the block (the residual stream).
    """
    check_hook_point(hook_point)
    spec = arch_spec(model)
    n_layers = len(spec.blocks(model))
    layers = range(n_layers) if layers is None else layers
    handles = []
    try:
        for layer in layers:
            if hook_point == "mlp":
                module = spec.down_module(model, layer)
                handles.append(
                    module.register_forward_pre_hook(functools.partial(_pre_hook, fn, layer))
                )
            else:
                module = (
                    spec.down_module(model, layer)
                    if hook_point == "mlp_out"
                    else spec.blocks(model)[layer]
                )
                handles.append(
                    module.register_forward_hook(functools.partial(_post_hook, fn, layer))
                )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(fn, layer, module, args):
    out = fn(layer, args[0])
    if out is None:
        return None
    return (out, *args[1:])


def _post_hook(fn, layer, module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    out = fn(layer, hidden)
    if out is None:
        return None
    return (out, *output[1:]) if isinstance(output, tuple) else out


def layer_count(model: torch.nn.Module) -> int:
    """Number of transformer blocks of ``model``."""
    return len(arch_spec(model).blocks(model))


def neurons_per_layer(model: torch.nn.Module, hook_point: str = "mlp") -> list[int]:
    """Width of the hook point in each layer (neurons, or the hidden size for ``"mlp_out"`` and
    ``"resid"``)."""
    check_hook_point(hook_point)
    spec = arch_spec(model)
    if hook_point != "mlp":
        return [model.config.hidden_size] * layer_count(model)
    return [spec.n_neurons(model, layer) for layer in range(layer_count(model))]
