"""llm2bids: neuroimaging for language models.

A forward pass of a language model over text is treated as an fMRI scan: MLP neurons are
voxels, tokens are volumes. Runs are written as 4D NIfTI files in a BIDS dataset, so that
nibabel, nilearn, pybids and the BIDS validator work on them unchanged.

The names below are imported on first use (PEP 562), so that ``llm2bids.recording`` loads
without the analysis stack (nilearn, pybids): a GPU box that only records needs torch,
transformers, numpy, pandas and nibabel.
"""

from __future__ import annotations

import importlib

from ._version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "FunctionalNetworks": "decomposition",
    "VoxelGeometry": "bids",
    "build_group_report": "report",
    "build_report": "report",
    "compare_pruning": "pruning_comparison",
    "dask_cluster": "_parallel",
    "find_runs": "bids",
    "load_model": "models",
    "load_pruned": "evaluation",
    "load_run": "bids",
    "mask_neurons": "evaluation",
    "neuron_masker": "bids",
    "prune": "evaluation",
    "rank_neurons": "evaluation",
    "read_neuron_set": "evaluation",
    "record": "recording",
    "replicate": "replication",
    "run_demo": "demo",
    "run_group_localize": "glm",
    "run_group_networks": "decomposition",
    "run_lesion": "evaluation",
    "run_localize": "glm",
    "run_networks": "decomposition",
    "run_prune": "evaluation",
    "save_pruned": "evaluation",
    "top_neurons": "evaluation",
    "validate": "bids",
}
_SUBPACKAGES = (
    "bids",
    "cli",
    "decomposition",
    "evaluation",
    "glm",
    "models",
    "overlap",
    "recording",
    "report",
    "stimuli",
)

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
