"""llm2bids: neuroimaging for language models.

A forward pass of a language model over text is treated as an fMRI scan: MLP neurons are
voxels, tokens are volumes. Runs are written as 4D NIfTI files in a BIDS dataset, so that
nibabel, nilearn, pybids and the BIDS validator work on them unchanged.
"""

from ._version import __version__
from .bids import VoxelGeometry, find_runs, load_run, neuron_masker, validate
from .models import load_model
from .recording import record

__all__ = [
    "VoxelGeometry",
    "__version__",
    "find_runs",
    "load_model",
    "load_run",
    "neuron_masker",
    "record",
    "validate",
]
