"""Where the layers, the neuron hook point and the MLP weights live, architecture by architecture.

The MLP neurons of a layer are the input of its down projection: after the activation and, in
gated MLPs, after the gate product. One :class:`ArchSpec` per ``config.model_type`` says where
to find that module and the projections that produce the neurons, so recording, masking and
pruning all read the same table.

To add an architecture::

    from llm2bids.models import ArchSpec, register_architecture
    register_architecture("my_arch", ArchSpec(layers="model.layers", mlp="mlp",
                                             down="down_proj", up=("up_proj",)))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..exceptions import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture.

    Parameters
    ----------
    layers : str
        Dotted path from the ``*ForCausalLM`` model to the ``ModuleList`` of blocks.
    mlp : str
        Dotted path from a block to its MLP (``""`` when the block holds the projections).
    down : str
        Name (in the MLP) of the down projection; its input is the neurons.
    up : tuple of str
        Names (in the MLP) of the projections whose outputs are the neurons (gate and up).
    fused_gate_up : bool, default=False
        ``up`` is one module whose output stacks the gate then the up halves (Phi-3).
    conv1d : bool, default=False
        Weights are GPT-2 ``Conv1D`` (``(in, out)`` instead of ``(out, in)``).
    """

    layers: str
    mlp: str
    down: str
    up: tuple[str, ...]
    fused_gate_up: bool = False
    conv1d: bool = False

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The model's list of transformer blocks."""
        return _get(model, self.layers)

    def mlp_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The MLP (or the block, for architectures without an MLP module) of ``layer``."""
        block = self.blocks(model)[layer]
        return _get(block, self.mlp) if self.mlp else block

    def down_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The down projection of ``layer``: its input is the layer's neurons."""
        return getattr(self.mlp_module(model, layer), self.down)

    def n_neurons(self, model: torch.nn.Module, layer: int) -> int:
        """Neurons in ``layer`` (the down projection's input width)."""
        down = self.down_module(model, layer)
        return down.weight.shape[0] if self.conv1d else down.weight.shape[1]


_GATED = ArchSpec(layers="model.layers", mlp="mlp", down="down_proj", up=("gate_proj", "up_proj"))
_FC = ArchSpec(layers="model.layers", mlp="mlp", down="fc2", up=("fc1",))
_BLOOMLIKE = ArchSpec(
    layers="transformer.h", mlp="mlp", down="dense_4h_to_h", up=("dense_h_to_4h",)
)

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: _GATED
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "phi3": ArchSpec(
        layers="model.layers", mlp="mlp", down="down_proj", up=("gate_up_proj",), fused_gate_up=True
    ),
    "gpt2": ArchSpec(layers="transformer.h", mlp="mlp", down="c_proj", up=("c_fc",), conv1d=True),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", mlp="mlp", down="dense_4h_to_h", up=("dense_h_to_4h",)
    ),
    "opt": ArchSpec(layers="model.decoder.layers", mlp="", down="fc2", up=("fc1",)),
    "phi": _FC,
    "bloom": _BLOOMLIKE,
    "falcon": _BLOOMLIKE,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add (or replace) the hook-point description of ``model_type``."""
    ARCHITECTURES[model_type] = spec


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """Return the :class:`ArchSpec` of a transformers causal LM.

    Raises
    ------
    UnsupportedArchitectureError
        When ``model.config.model_type`` is not registered.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add it, describe where its blocks, MLP, "
            "down projection and up/gate projections live with "
            "llm2bids.models.register_architecture(model_type, ArchSpec(...))."
        )
    return ARCHITECTURES[model_type]


def _get(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
