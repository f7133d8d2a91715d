"""Models: loading, the architecture registry and hooks on the neuron hook point."""

from .hooks import HOOK_POINTS, layer_count, neuron_hooks, neurons_per_layer
from .loading import (
    DEFAULT_MODEL,
    LoadedModel,
    clean_label,
    embedded_model_path,
    load_model,
    resolve_device,
    resolve_dtype,
    wrap_model,
)
from .registry import (
    ARCHITECTURES,
    ArchSpec,
    arch_spec,
    discover_architecture,
    register_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "HOOK_POINTS",
    "ArchSpec",
    "LoadedModel",
    "arch_spec",
    "discover_architecture",
    "clean_label",
    "embedded_model_path",
    "layer_count",
    "load_model",
    "neuron_hooks",
    "neurons_per_layer",
    "register_architecture",
    "resolve_device",
    "resolve_dtype",
    "wrap_model",
]
