"""llm2bids: neuroimaging for language models.

A forward pass of a language model over text is treated as an fMRI scan: MLP neurons are
voxels, tokens are volumes. Runs are written as 4D NIfTI files in a BIDS dataset, so that
nibabel, nilearn, pybids and the BIDS validator work on them unchanged.
"""

from ._version import __version__
from .bids import VoxelGeometry, find_runs, load_run, neuron_masker, validate
from .decomposition import FunctionalNetworks, run_networks
from .evaluation import load_pruned, mask_neurons, prune, run_lesion, save_pruned
from .glm import run_localize
from .models import load_model
from .recording import record

__all__ = [
    "FunctionalNetworks",
    "VoxelGeometry",
    "__version__",
    "find_runs",
    "load_model",
    "load_pruned",
    "load_run",
    "mask_neurons",
    "neuron_masker",
    "prune",
    "record",
    "run_lesion",
    "run_localize",
    "run_networks",
    "save_pruned",
    "validate",
]
