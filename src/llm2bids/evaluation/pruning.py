"""Pruning: remove neurons physically from the MLP weights (saving and loading the result is
:mod:`llm2bids.models.pruned`'s).

The architecture registry says which rows of the up/gate projections and which columns of the
down projection belong to each neuron; keeping a subset gives smaller matrices with
per-layer sizes. With zero filling, the pruned model computes exactly what the masked model
computes in ``keep`` mode; with bias compensation (FLAP-style), what it computes with mean
filling.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from .._docs import fill_doc
from ..exceptions import InputError
from ..models import LoadedModel, arch_spec
from ..models.pruned import _check_pruned_folder, _slice_mlp, load_pruned, save_pruned
from .masking import check_mask

__all__ = ["load_pruned", "prune", "run_prune", "save_pruned"]


def prune(
    model: torch.nn.Module | LoadedModel,
    keep: np.ndarray,
    means: np.ndarray | None = None,
) -> torch.nn.Module:
    """Return a copy of ``model`` with only the ``keep`` neurons in its MLPs.

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
    keep : ndarray of bool, shape (n_layers, n_neurons)
        Neurons to keep.
    means : ndarray of shape (n_layers, n_neurons) or None, default=None
        FLAP-style bias compensation: the down projection's bias absorbs the removed neurons'
        mean contribution (see :func:`~llm2bids.evaluation.masking.neuron_means`).

    Returns
    -------
    torch.nn.Module
        The pruned copy; ``model`` is left unchanged.
    """
    base = model.model if isinstance(model, LoadedModel) else model
    keep = ~check_mask(base, keep, "keep")
    spec = arch_spec(base)
    offloaded = sorted({n.rsplit(".", 1)[0] for n, p in base.named_parameters() if p.is_meta})
    if offloaded:
        raise InputError(
            f"pruning edits the weights, and {len(offloaded)} modules ({offloaded[0]}, ...) are "
            "offloaded (on the meta device): load the model without disk offload to prune it. "
            "Masking (mask_neurons) works on offloaded models."
        )
    pruned = copy.deepcopy(base)
    n_neurons = keep.shape[1]
    kept = []
    for layer in range(keep.shape[0]):
        idx = torch.as_tensor(np.flatnonzero(keep[layer]), dtype=torch.long)
        mlp = spec.mlp_module(pruned, layer)
        extra = None
        if means is not None:
            down = getattr(mlp, spec.down)
            removed = np.flatnonzero(~keep[layer])
            mu = torch.as_tensor(
                means[layer][removed], dtype=torch.float32, device=down.weight.device
            )
            w = down.weight.data.float()
            extra = (mu @ w[removed]) if spec.conv1d else (w[:, removed] @ mu)
        _slice_mlp(mlp, spec, idx, n_neurons, extra)
        kept.append(idx.tolist())
    pruned.llm2bids_kept_neurons = kept
    _drop_dequantized_quantizer(pruned)
    return pruned


def _drop_dequantized_quantizer(model: torch.nn.Module) -> None:
    """Forget a GGUF quantizer: such weights are dequantized to float when loaded.

    transformers keeps the GGUF ``quantization_config`` on a model loaded from a ``.gguf``
    file and then refuses ``save_pretrained``; the pruned copy holds plain float tensors.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


@fill_doc
def run_prune(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    model: str | LoadedModel,
    keep: str | Path | np.ndarray,
    output_dir: str | Path,
    *,
    component: int | None = None,
    bias_compensation: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    calibration_file: str | Path | None = None,
    protected_layers=(),
) -> dict:
    """Prune a model to a neuron set and save it: what ``llm2bids prune`` does.

    Parameters
    ----------
    model : str or LoadedModel
        A model spec (hub id, folder, ``.gguf`` file) or a loaded model.
    keep : str, Path or ndarray of bool
        The neurons to keep: a neuron-set file (see
        :func:`~llm2bids.evaluation.read_neuron_set`) or a ``(n_layers, n_neurons)`` mask.
    output_dir : str or Path
        Folder of the pruned model (reload it with :func:`load_pruned`).
    component : int or None, default=None
        With a neuron-set file: keep only this network.
    bias_compensation : bool, default=False
        FLAP-style: fold the removed neurons' mean over the calibration text into the down
        projection's bias.
    %(device)s
    overwrite : bool, default=False
        Replace a pruned model already in ``output_dir`` (never anything else).
    calibration_file : str, Path or None, default=None
        Text file for the means of ``bias_compensation``; ``None`` is the built-in recording
        stimuli. It must not overlap the built-in held-out (evaluation) text.
    protected_layers : sequence of int, default=()
        Layers kept whole (negative numbers count from the end; the pruning paper keeps
        ``[0, 1, 2, -2, -1]``).

    Returns
    -------
    dict
        ``kept_neurons``, ``total_neurons``, ``parameters_dense``, ``parameters_pruned`` and
        ``folder``.
    """
    from ..models import load_model
    from ..models.hooks import layer_count, neurons_per_layer
    from .masking import neuron_means, protect_layers, resolve_layers
    from .neuronsets import check_set_file, read_neuron_set, set_entities
    from .texts import calibration_label, read_text_file, resolve_texts

    _check_pruned_folder(Path(output_dir), overwrite)  # before loading anything
    keep_source = "a mask given in Python" if isinstance(keep, np.ndarray) else keep
    if not isinstance(keep, np.ndarray):
        check_set_file(keep, "keep")
        if set_entities(keep).acquisition == "mlpout":
            raise InputError(
                f"{Path(keep).name} is a set of MLP output dimensions (acq-mlpout): those are "
                "hidden-size dimensions every layer shares, not neurons that can be cut out of "
                "the weights. Prune with a set of MLP neurons (acq-mlp); mask output "
                "dimensions with `llm2bids lesion` instead."
            )
    calibration = None
    if bias_compensation:
        text = (
            None
            if calibration_file is None
            else read_text_file(calibration_file, "calibration text")
        )
        _, calibration = resolve_texts(None, text, "mean")
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    resolve_layers(protected_layers, layer_count(lm.model))
    if not isinstance(keep, np.ndarray):
        keep = read_neuron_set(
            keep, layer_count(lm.model), neurons_per_layer(lm.model)[0], component=component
        )
    keep = protect_layers(keep, protected_layers, "keep")
    means = neuron_means(lm, calibration) if bias_compensation else None
    pruned = prune(lm.model, keep, means=means)
    folder = save_pruned(
        pruned,
        lm.tokenizer,
        output_dir,
        source=lm.spec,
        overwrite=overwrite,
        parameters={
            "keep": str(keep_source),
            "component": component,
            "protected_layers": list(protected_layers),
            "bias_compensation": bias_compensation,
            "calibration": calibration_label(bias_compensation, calibration_file),
        },
    )
    return {
        "kept_neurons": int(keep.sum()),
        "total_neurons": int(keep.size),
        "parameters_dense": sum(p.numel() for p in lm.model.parameters()),
        "parameters_pruned": sum(p.numel() for p in pruned.parameters()),
        "folder": folder,
    }
