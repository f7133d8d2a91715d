"""Where the layers, the neuron hook point and the MLP weights live, architecture by architecture.

The MLP neurons of a layer are the input of its down projection: after the activation and, in
gated MLPs, after the gate product. One :class:`ArchSpec` per ``config.model_type`` says where
to find that module and the projections that produce the neurons, so recording, masking and
pruning all read the same table.

An architecture that is not registered is understood from its structure when it can be
(:func:`discover_architecture`): the ``ModuleList`` of ``num_hidden_layers`` blocks (each with
an attention module: a transformer decoder), and in a block the one linear layer that maps the MLP width back to the hidden size (the down
projection), with the layers beside it that map the hidden size to the MLP width (up, gate).
Such a spec says ``discovered=True``, and the recording's sidecar says so. Mixture-of-experts
models are refused (see :func:`arch_spec`).

To add an architecture::

    from llm2bids.models import ArchSpec, register_architecture
    register_architecture("my_arch", ArchSpec(layers="model.layers", mlp="mlp",
                                             down="down_proj", up=("up_proj",)))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._docs import fill_doc
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
    discovered : bool, default=False
        Found by :func:`discover_architecture` rather than registered.
    """

    layers: str
    mlp: str
    down: str
    up: tuple[str, ...]
    fused_gate_up: bool = False
    conv1d: bool = False
    discovered: bool = False

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The model's list of transformer blocks.

        Parameters
        ----------
        model : torch.nn.Module
            A model of this architecture.
        """
        return _get(model, self.layers)

    @fill_doc
    def mlp_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The MLP (or the block, for architectures without an MLP module) of ``layer``.

        Parameters
        ----------
        %(model_of_arch)s
        %(layer_index)s
        """
        block = self.blocks(model)[layer]
        return _get(block, self.mlp) if self.mlp else block

    @fill_doc
    def down_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The down projection of ``layer``: its input is the layer's neurons.

        Parameters
        ----------
        %(model_of_arch)s
        %(layer_index)s
        """
        return getattr(self.mlp_module(model, layer), self.down)

    @fill_doc
    def n_neurons(self, model: torch.nn.Module, layer: int) -> int:
        """Neurons in ``layer`` (the down projection's input width).

        Parameters
        ----------
        %(model_of_arch)s
        %(layer_index)s
        """
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
    """Add (or replace) the hook-point description of ``model_type``.

    Parameters
    ----------
    model_type : str
        ``config.model_type`` of the architecture.
    spec : ArchSpec
        Where its blocks, MLPs and projections are.
    """
    ARCHITECTURES[model_type] = spec


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """Return the :class:`ArchSpec` of a transformers causal LM.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.

    The registered spec of ``model.config.model_type`` when there is one, else the spec
    :func:`discover_architecture` finds (remembered per model type and class).

    Raises
    ------
    UnsupportedArchitectureError
        For an unregistered mixture-of-experts model, or a layout that cannot be understood.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    key = (model_type, type(model).__name__)
    if key not in _DISCOVERED:  # walks the modules once per model type, not per call
        _DISCOVERED[key] = discover_architecture(model)
    return _DISCOVERED[key]


_DISCOVERED: dict[tuple, ArchSpec] = {}
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_INTERMEDIATE = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")


def _refuse_mixture_of_experts(model: torch.nn.Module, model_type) -> None:
    config = getattr(model, "config", None)
    experts = max((getattr(config, a, None) or 0 for a in _EXPERT_COUNTS), default=0)
    named = any(name.endswith(".experts") for name, _ in model.named_modules())
    if (isinstance(experts, int) and experts > 1) or named:
        raise UnsupportedArchitectureError(
            f"{model_type!r} is a mixture-of-experts model, which llm2bids does not record: each "
            "token passes through a few experts chosen by a router, so an expert's neurons have "
            "no value at the other tokens, and a volume of all neurons at every token would be "
            "mostly undefined. Record a dense model, or the residual stream of this one once "
            "that is supported for mixtures of experts."
        )


def discover_architecture(model: torch.nn.Module) -> ArchSpec:
    """Find the blocks, the MLP and its projections of an unregistered model by structure.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM.

    Returns
    -------
    ArchSpec
        With ``discovered=True``.

    Raises
    ------
    UnsupportedArchitectureError
        For a mixture-of-experts model; when the blocks or a single down projection cannot be
        found, or what is found does not agree with the config.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    _refuse_mixture_of_experts(model, model_type)

    def refuse(why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"architecture {model_type!r} is not registered and its layout could not be "
            f"understood ({why}); registered: {', '.join(sorted(ARCHITECTURES))}. Describe "
            "where its blocks, MLP, down projection and up/gate projections live with "
            "llm2bids.models.register_architecture(model_type, ArchSpec(...))."
        )

    n_layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    if not n_layers or not hidden:
        raise refuse("its config has no num_hidden_layers / hidden_size")
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name
    ]
    if not lists:
        raise refuse(f"no list of {n_layers} blocks")
    layers = min(lists, key=lambda name: (name.count("."), name))
    block = _get(model, layers)[0]
    if not any(
        "attn" in name.lower() or "attention" in name.lower() for name, _ in block.named_modules()
    ):
        raise refuse("its blocks have no attention: not a transformer decoder")
    widths = {name: _widths(m) for name, m in block.named_modules() if _widths(m)}
    downs = [n for n, (i, o) in widths.items() if o == hidden and i != hidden]
    intermediate = next(
        (getattr(config, a) for a in _INTERMEDIATE if getattr(config, a, None)), None
    )
    if len(downs) > 1 and intermediate:
        downs = [n for n in downs if widths[n][0] == intermediate]
    if len(downs) != 1:
        raise refuse(
            f"{len(downs)} linear layers map a wider input to the hidden size {hidden} in a block"
            + (f": {', '.join(downs)}" if downs else "")
        )
    down_path = downs[0]
    mlp, _, down = down_path.rpartition(".")
    width = widths[down_path][0]
    if intermediate and width != intermediate:
        raise refuse(
            f"the down projection {down_path} takes {width} inputs, the config {intermediate}"
        )
    siblings = {
        n.rpartition(".")[2]: io
        for n, io in widths.items()
        if n.rpartition(".")[0] == mlp and n != down_path
    }
    up = tuple(n for n, (i, o) in siblings.items() if i == hidden and o in (width, 2 * width))
    fused = any(siblings[n][1] == 2 * width for n in up)
    if not up or (fused and len(up) > 1):
        raise refuse(f"no projection beside {down_path} maps the hidden size to its {width} inputs")
    conv1d = type(_get(block, down_path)).__name__ == "Conv1D"
    return ArchSpec(
        layers=layers,
        mlp=mlp,
        down=down,
        up=up,
        fused_gate_up=fused,
        conv1d=conv1d,
        discovered=True,
    )


def _widths(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer (``nn.Linear`` or transformers' ``Conv1D``), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _get(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
