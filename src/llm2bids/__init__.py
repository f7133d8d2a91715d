"""llm2bids: neuroimaging for language models.

A forward pass of a language model over text is treated as an fMRI scan: MLP neurons are
voxels, tokens are volumes. Runs are written as 4D NIfTI files in a BIDS dataset, so that
nibabel, nilearn, pybids and the BIDS validator work on them unchanged.
"""

from ._parallel import dask_cluster
from ._version import __version__
from .bids import VoxelGeometry, find_runs, load_run, neuron_masker, validate
from .decomposition import FunctionalNetworks, run_networks
from .demo import run_demo
from .evaluation import (
    load_pruned,
    mask_neurons,
    prune,
    rank_neurons,
    read_neuron_set,
    run_lesion,
    run_prune,
    save_pruned,
    top_neurons,
)
from .glm import run_localize
from .models import load_model
from .recording import record
from .replication import replicate
from .report import build_report

__all__ = [
    "FunctionalNetworks",
    "build_report",
    "dask_cluster",
    "replicate",
    "run_demo",
    "VoxelGeometry",
    "__version__",
    "find_runs",
    "load_model",
    "load_pruned",
    "load_run",
    "mask_neurons",
    "neuron_masker",
    "prune",
    "rank_neurons",
    "read_neuron_set",
    "record",
    "run_lesion",
    "run_localize",
    "run_networks",
    "run_prune",
    "save_pruned",
    "top_neurons",
    "validate",
]
