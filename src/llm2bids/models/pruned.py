"""The pruned-model format: smaller MLP matrices saved with ``save_pretrained``, and read back.

A pruned model is a transformers folder plus ``llm2bids_pruning.json``: which neurons each
layer kept, the per-layer sizes and the biases. When every layer keeps as many neurons,
``config.json`` declares the kept width and plain ``AutoModelForCausalLM.from_pretrained``
loads it. Otherwise a modeling file saved beside the weights (``llm2bids_pruned.py``, from
:mod:`._pruned_modeling`, named by ``config.json``'s ``auto_map``) builds each layer at its
width for ``from_pretrained(folder, trust_remote_code=True)``, and :func:`load_pruned` (or
:func:`llm2bids.load_model`) rebuilds the per-layer shapes without running it. Pruning itself (choosing and cutting the neurons) is in
:mod:`llm2bids.evaluation.pruning`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from .. import _io
from ..bids.dataset import generated_by
from ..exceptions import InputError, ModelLoadError
from .loading import PRUNED_MODEL_FILE, LoadedModel, resolve_dtype
from .registry import arch_spec


def _out_slice(module, rows: torch.Tensor, conv1d: bool):
    """A copy of ``module`` keeping output features ``rows``."""
    w = module.weight.data
    bias = module.bias.data[rows] if module.bias is not None else None
    if conv1d:
        new = Conv1D(len(rows), w.shape[0])
        new.weight.data = w[:, rows].clone()
    else:
        new = torch.nn.Linear(w.shape[1], len(rows), bias=bias is not None)
        new.weight.data = w[rows].clone()
    if bias is not None:
        new.bias.data = bias.clone()
    return new.to(w.device, w.dtype)


def _in_slice(module, cols: torch.Tensor, conv1d: bool, extra_bias: torch.Tensor | None):
    """A copy of ``module`` keeping input features ``cols`` (and adding ``extra_bias``)."""
    w = module.weight.data
    bias = module.bias.data.clone() if module.bias is not None else None
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
    if conv1d:
        new = Conv1D(w.shape[1], len(cols))
        new.weight.data = w[cols].clone()
        if bias is None:
            new.bias = None
    else:
        new = torch.nn.Linear(len(cols), w.shape[0], bias=bias is not None)
        new.weight.data = w[:, cols].clone()
    if bias is not None:
        new.bias.data = bias.to(w.dtype)
    return new.to(w.device, w.dtype)


def _slice_mlp(mlp, spec, idx: torch.Tensor, n_neurons: int, extra_bias=None) -> None:
    """Keep neurons ``idx`` of one MLP (of ``n_neurons``): rows of the up (and gate)
    projections, columns of the down projection (whose bias gains ``extra_bias``)."""
    rows = torch.cat([idx, idx + n_neurons]) if spec.fused_gate_up else idx
    for name in spec.up:
        setattr(mlp, name, _out_slice(getattr(mlp, name), rows, spec.conv1d))
    down = getattr(mlp, spec.down)
    setattr(mlp, spec.down, _in_slice(down, idx, spec.conv1d, extra_bias))


def save_pruned(
    model: torch.nn.Module,
    tokenizer,
    path: str | Path,
    source: str = "n/a",
    overwrite: bool = False,
    parameters: dict | None = None,
) -> Path:
    """Save a pruned model with ``save_pretrained`` plus its per-layer sizes.

    Parameters
    ----------
    model : torch.nn.Module
        A model returned by :func:`prune`.
    tokenizer : transformers tokenizer or None
        Saved beside it, so that :func:`load_pruned` gives both back.
    path : str or Path
        The folder.
    source : str, default="n/a"
        The spec of the model it was pruned from (recorded in ``llm2bids_pruning.json``).
    overwrite : bool, default=False
        Replace a pruned model already saved in ``path``. A folder that holds anything else
        is never written into.
    parameters : dict or None, default=None
        How the kept set was chosen (recorded as ``Parameters`` in ``llm2bids_pruning.json``).
    """
    kept = getattr(model, "llm2bids_kept_neurons", None)
    if kept is None:
        raise InputError("this model was not made by llm2bids.prune(); nothing records its sizes.")
    path = Path(path)
    _check_pruned_folder(path, overwrite)
    (path / MODELING_FILE).unlink(missing_ok=True)  # a replaced model's, if any
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    spec = arch_spec(model)
    down_bias = [
        getattr(spec.mlp_module(model, i), spec.down).bias is not None for i in range(len(kept))
    ]
    sizes = [len(k) for k in kept]
    plain = _declare_uniform_width(path, model, sizes, down_bias)
    remote = not plain and _declare_remote_code(path, model, sizes, down_bias)
    _io.write_json(
        path / PRUNED_MODEL_FILE,
        {
            "GeneratedBy": generated_by(),
            "Source": source,
            "Parameters": parameters or {},
            "Architecture": model.config.model_type,
            "NeuronsPerLayer": [len(k) for k in kept],
            "DownBias": down_bias,
            "LoadsWithTransformers": plain,
            "LoadsWithTrustRemoteCode": remote,
            "KeptNeurons": kept,
        },
    )
    return path


#: Config attributes that hold the MLP width, by what transformers' configs call it.
WIDTH_ATTRIBUTES = ("intermediate_size", "n_inner", "ffn_dim")


def _has_pruned_shapes(built, spec, sizes: list[int], down_bias: list[bool]) -> bool:
    """Whether a model built from a config has every layer's kept width and down bias."""
    return all(
        spec.n_neurons(built, layer) == size
        and (spec.down_module(built, layer).bias is not None) == bias
        for layer, (size, bias) in enumerate(zip(sizes, down_bias))
    )


def _declare_uniform_width(path: Path, model, sizes: list[int], down_bias: list[bool]) -> bool:
    """Write the kept width into a saved ``config.json`` when plain transformers can build it.

    When every layer keeps as many neurons, the config attribute of the MLP width (one of
    :data:`WIDTH_ATTRIBUTES`) set to that count makes ``AutoModelForCausalLM.from_pretrained``
    build the pruned shapes, provided the model it builds (checked on the meta device) has
    that width in every layer and the same down-projection biases (a compensated bias on an
    architecture without one cannot be declared). Returns whether the config was changed.
    """
    from transformers import AutoModelForCausalLM

    if len(set(sizes)) != 1:
        return False
    spec = arch_spec(model)
    for attribute in WIDTH_ATTRIBUTES:
        if attribute not in model.config.to_dict():
            continue
        config = copy.deepcopy(model.config)
        setattr(config, attribute, sizes[0])
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        if _has_pruned_shapes(built, spec, sizes, down_bias):
            saved = _io.read_json(path / "config.json")
            _io.write_json(path / "config.json", saved | {attribute: sizes[0]})
            return True
    return False


#: The modeling file saved beside a pruned model whose layers keep different widths.
MODELING_FILE = "llm2bids_pruned.py"
_MODELING_TEMPLATE = Path(__file__).with_name("_pruned_modeling.py")


def _modeling_source(model) -> str | None:
    """The modeling file of ``model``'s architecture (None for a class transformers lacks)."""
    import re

    import transformers

    base = type(model).__name__
    if not isinstance(getattr(transformers, base, None), type):
        return None
    spec = arch_spec(model)
    values = {
        "BASE": base,
        "LAYERS": spec.layers,
        "MLP": spec.mlp,
        "UP": tuple(spec.up),
        "DOWN": spec.down,
        "FUSED_GATE_UP": bool(spec.fused_gate_up),
        "CONV1D": bool(spec.conv1d),
    }
    source = _MODELING_TEMPLATE.read_text()
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
        assert n == 1, name
    return source


def _declare_remote_code(path: Path, model, sizes: list[int], down_bias: list[bool]) -> bool:
    """Save the modeling file that lets plain transformers build unequal layers.

    ``config.json`` gains the per-layer widths and an ``auto_map`` entry naming the file, so
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds them; the
    file is first checked by building the model it defines on the meta device. Returns
    whether it was saved (not for an architecture it cannot build).
    """
    source = _modeling_source(model)
    if source is None:
        return False
    config = copy.deepcopy(model.config)
    config.llm2bids_neurons_per_layer = sizes
    config.llm2bids_down_bias = down_bias
    namespace: dict = {}
    exec(compile(source, MODELING_FILE, "exec"), namespace)  # noqa: S102 (our own template)
    spec = arch_spec(model)
    try:
        with torch.device("meta"):
            built = namespace["PrunedForCausalLM"](config)
    except Exception:  # noqa: BLE001 (an architecture the file does not fit: not declared)
        return False
    if not _has_pruned_shapes(built, spec, sizes, down_bias):
        return False
    (path / MODELING_FILE).write_text(source)
    saved = _io.read_json(path / "config.json")
    auto_map = saved.get("auto_map", {}) | {
        "AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.PrunedForCausalLM"
    }
    _io.write_json(
        path / "config.json",
        saved
        | {
            "auto_map": auto_map,
            "llm2bids_neurons_per_layer": sizes,
            "llm2bids_down_bias": down_bias,
        },
    )
    return True


def _check_pruned_folder(path: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds files, unless it is a pruned model to replace."""
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"{path} is a file; pass a folder for the pruned model.")
    if not any(path.iterdir()):
        return
    if not (path / PRUNED_MODEL_FILE).exists():
        raise InputError(
            f"{path} already holds files that are not a pruned model; nothing was written. "
            "Choose a new or empty folder for the pruned model."
        )
    if not overwrite:
        raise InputError(
            f"{path} already holds a pruned model; pass --overwrite (overwrite=True) to "
            "replace it, or choose another folder."
        )


def _legacy_renamed(model: torch.nn.Module, state: dict) -> dict:
    """Undo the key renamings transformers applies on save (e.g. GPT-NeoX's ``embed_out``)."""
    import re

    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4.x saves the module names as they are
        return state
    known = set(model.state_dict())
    renamings = [
        (src, tgt)
        for t in extract_weight_conversions_for_model(model) or []
        if isinstance(t, WeightRenaming)
        for src, tgt in zip(t.source_patterns, t.target_patterns)
    ]
    out = {}
    for key, value in state.items():
        if key not in known:
            for src, tgt in renamings:
                renamed = re.sub(src, tgt, key)
                if renamed in known:
                    key = renamed
                    break
        out[key] = value
    return out


def load_pruned(
    path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load a model saved by :func:`save_pruned`.

    Parameters
    ----------
    path : str or Path
        The folder :func:`save_pruned` wrote.
    device : str, default="cpu"
    dtype : {"float32", "bfloat16", "float16"} or torch.dtype or None, default=None
        ``None``: the dtype the model was saved in.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelLoadError
        When the folder lacks the per-layer sizes (``llm2bids_pruning.json``).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info_path = path / PRUNED_MODEL_FILE
    if not info_path.exists():
        raise ModelLoadError(
            f"{path} has no {PRUNED_MODEL_FILE} with the per-layer sizes, so its pruned matrices "
            "cannot be rebuilt; pass a folder written by llm2bids.save_pruned / `llm2bids prune`."
        )
    info = json.loads(info_path.read_text())
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    spec = arch_spec(model)
    for layer, (size, has_bias) in enumerate(zip(info["NeuronsPerLayer"], info["DownBias"])):
        mlp = spec.mlp_module(model, layer)
        down = getattr(mlp, spec.down)
        extra = (  # a compensated bias the unpruned architecture lacks
            torch.zeros(down.weight.shape[1 if spec.conv1d else 0])
            if has_bias and down.bias is None
            else None
        )
        _slice_mlp(mlp, spec, torch.arange(size), spec.n_neurons(model, layer), extra)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise ModelLoadError(f"{path} holds no .safetensors weights.")
    state = _legacy_renamed(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed_out" in k}
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"{path}: weights do not fit the pruned shapes (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})."
        )
    if tied:
        model.tie_weights()
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model.to(device=device, dtype=resolve_dtype(dtype or torch.float32)).eval()
    model.llm2bids_kept_neurons = info["KeptNeurons"]
    tokenizer = (
        AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    )
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=str(path), model_id=path.name, source="folder"
    )
