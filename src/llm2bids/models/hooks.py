"""Forward hooks on the neuron hook point, always removed, each bound to its own layer.

The reference implementation bound the layer index late (a closure over a loop variable), so
every hook saw the last layer's index. Here each hook is a ``functools.partial`` with its layer
fixed at registration, and hooks live only inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import torch

from .._docs import fill_doc
from ..bids.names import acquisition_label
from ..exceptions import check_choice
from .registry import arch_spec

HOOK_POINTS = ("mlp", "mlp_out", "resid")
#: What each hook point records (written into the sidecars and the report's methods).
HOOK_POINT_DESCRIPTIONS = {
    "mlp": "MLP neurons: input of the down projection (after the activation and gate product)",
    "mlp_out": "MLP output: output of the down projection (hidden-size dimensions), the hook "
    "point of arXiv 2502.20408",
    "resid": "residual stream: output of each transformer block (the last one before the "
    "final norm, unlike transformers' last hidden_states)",
}


def hook_point_of(acquisition: str | None) -> str | None:
    """The hook point an ``acq-`` label names (``None`` when it names none)."""
    return next((h for h in HOOK_POINTS if acquisition_label(h) == acquisition), None)


def check_hook_point(hook_point: str) -> None:
    """Refuse a hook point that does not exist, naming those that do."""
    check_choice("hook_point", hook_point, HOOK_POINTS)


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


def hooked_module_name(model: torch.nn.Module, layer: int, hook_point: str = "mlp") -> str:
    """Dotted name (in ``model``) of the module whose input or output ``hook_point`` is.

    Parameters
    ----------
    model : torch.nn.Module
    layer : int
    hook_point : {"mlp", "mlp_out", "resid"}, default="mlp"
        ``"mlp"`` and ``"mlp_out"`` name the down projection, ``"resid"`` the block.
    """
    check_hook_point(hook_point)
    spec = arch_spec(model)
    block = f"{spec.layers}.{layer}"
    if hook_point == "resid":
        return block
    return ".".join(part for part in (block, spec.mlp, spec.down) if part)


def hook_device(
    model: torch.nn.Module, layers: Sequence[int] | None = None, hook_point: str = "mlp"
) -> torch.device:
    """Where the activations of the hooked layers are computed: the device to capture them on.

    Not the device of the model's first module: a ``device_map`` can put the embeddings on
    ``"cpu"`` or ``"disk"`` and the layers on a GPU, and accelerate runs modules mapped to
    ``"cpu"`` or ``"disk"`` on the map's first accelerator, moving their weights there for each
    forward pass.

    Parameters
    ----------
    model : torch.nn.Module
    layers : sequence of int or None, default=None
        The hooked layers; ``None`` is all.
    hook_point : {"mlp", "mlp_out", "resid"}, default="mlp"

    Returns
    -------
    torch.device
        The first accelerator any hooked layer runs on, else the CPU.
    """
    layers = range(layer_count(model)) if layers is None else layers
    devices = [
        _execution_device(model, hooked_module_name(model, layer, hook_point)) for layer in layers
    ]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def _execution_device(model: torch.nn.Module, name: str) -> torch.device:
    """The device module ``name`` computes on (accelerate's hook, the device map, its weights)."""
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):  # the module, then its ancestors
        module = model.get_submodule(".".join(parts[:depth]))
        device = _hook_execution_device(getattr(module, "_hf_hook", None))
        if device is not None:
            return device
    device_map = getattr(model, "hf_device_map", None) or {}
    placed = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    if placed:
        where = device_map[max(placed, key=len)]
        if where in ("cpu", "disk"):  # accelerate runs it on the map's first accelerator
            where = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
        return _as_device(where)
    module = model.get_submodule(name)
    tensors = itertools.chain(module.parameters(), module.buffers(), model.parameters())
    return next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))


def _hook_execution_device(hook) -> torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return _as_device(device)
    return None


def _as_device(where) -> torch.device:
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)


def layer_count(model: torch.nn.Module) -> int:
    """Number of transformer blocks of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.
    """
    return len(arch_spec(model).blocks(model))


@fill_doc
def neurons_per_layer(model: torch.nn.Module, hook_point: str = "mlp") -> list[int]:
    """Width of the hook point in each layer (neurons, or the hidden size for ``"mlp_out"`` and
    ``"resid"``).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.
    %(hook_point)s
    """
    check_hook_point(hook_point)
    spec = arch_spec(model)
    if hook_point != "mlp":
        return [model.config.hidden_size] * layer_count(model)
    return [spec.n_neurons(model, layer) for layer in range(layer_count(model))]
