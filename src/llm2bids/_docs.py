"""Shared parameter documentation, after nilearn's ``docdict`` and ``fill_doc``.

A parameter that many public functions take is described once here; a docstring names it as
``%(name)s`` on a line of its own and :func:`fill_doc` puts the text in, indented to match.
"""

from __future__ import annotations

import re

docdict: dict[str, str] = {
    "bids_dir": """bids_dir : str or Path
    The raw dataset, as written by :func:`llm2bids.record`.""",
    "output_dir": """output_dir : str or Path
    The derivatives folder (created if needed; must differ from ``bids_dir``), for example
    ``<bids_dir>/derivatives/llm2bids``.""",
    "participant_label": """participant_label : sequence of str or None, default=None
    Subjects (models) to analyse, with or without ``sub-``; ``None`` takes every one.""",
    "tasks_filter": """tasks : sequence of str or None, default=None
    Tasks to keep; ``None`` keeps every one.""",
    "hook_point": """hook_point : {"mlp", "mlp_out", "resid"}, default="mlp"
    Which recording to use (the ``acq-`` entity): ``"mlp"``, the MLP neurons (input of each
    layer's down projection; ``acq-mlp``), ``"mlp_out"``, the MLP output (output of the down
    projection; ``acq-mlpout``), or ``"resid"``, the residual stream (output of each block).""",
    "verbose": """verbose : int, default=1
    0 is silent; 1 shows progress bars.""",
    "seed": """seed : int, default=0
    Seed of every random choice, so that a rerun gives the same result.""",
    "model_of_arch": """model : torch.nn.Module
    A model of this architecture.""",
    "layer_index": """layer : int
    The block's index.""",
    "lm": """lm : LoadedModel
    The model and its tokenizer, as :func:`llm2bids.load_model` returns them.""",
    "device": """device : str, default="auto"
    ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.""",
    "dtype": """dtype : {"float32", "bfloat16", "float16"}, default="float32"
    Precision the model computes in (activations are stored as float32 whatever it is).""",
    "n_controls": """n_controls : int, default=5
    Random neuron sets of the target's size per layer, each with its own seed.""",
    "component": """component : int or None, default=None
    Use only this network (TSV ``component`` column, dseg label or 4D volume, from 1).""",
    "text": """text : str or None, default=None
    Text for perplexity and next-token accuracy; ``None`` is the built-in held-out text.""",
    "pairs": """pairs : DataFrame or None, default=None
    Minimal pairs (``phenomenon, good, bad``); ``None`` is :func:`minimal_pairs`'s.""",
    "fill": """fill : {"zero", "mean"}, default="zero"
    What a masked neuron is replaced by: zero, or its mean activation over
    ``calibration_text``.""",
    "calibration_text": """calibration_text : str or None, default=None
    Text the means of ``fill="mean"`` are taken over; ``None`` is the built-in recording
    stimuli. It must not overlap the evaluation text (that would leak it into the model).""",
    "protected_layers": """protected_layers : sequence of int, default=()
    Layers left whole: kept entirely in keep mode, never ablated in ablate mode (negative
    numbers count from the end; the pruning paper protects ``[0, 1, 2, -2, -1]``). Controls
    match the target layer by layer, so they are protected alike.""",
    "hook_point_mask": """hook_point : {"mlp", "mlp_out"}, default="mlp"
    Where the neuron set lives: MLP neurons, or MLP output dimensions (arXiv 2502.20408).""",
    "geometry": """geometry : VoxelGeometry
    Where each neuron sits in the volume (layers x neurons per layer).""",
    "slot": """slot : int
    Which of the recording's two host slots.""",
    "batch_tokens": """batch, tokens : int
    The batch's rows (runs) and their padded length in tokens.""",
    "repetition_time": """repetition_time : float, default=1.0
    Seconds per volume (one token); 1 s by convention.""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)%\((?P<name>\w+)\)s[ \t]*$", re.MULTILINE)


def fill_doc(obj):
    """Replace each ``%(name)s`` line of ``obj``'s docstring with ``docdict[name]``.

    Parameters
    ----------
    obj : function or class
        Decorated object; returned as it is, with its docstring filled.
    """
    doc = obj.__doc__
    if not doc:
        return obj

    def replace(match: re.Match) -> str:
        indent, name = match.group("indent"), match.group("name")
        try:
            text = docdict[name]
        except KeyError:
            raise KeyError(f"{obj.__qualname__}: no shared documentation for {name!r}") from None
        return "\n".join(indent + line if line else line for line in text.splitlines())

    obj.__doc__ = _PLACEHOLDER.sub(replace, doc)
    return obj
