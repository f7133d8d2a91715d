"""BIDS: names, geometry, dataset files, run I/O, reading back and validation."""

from .events import escape_token, read_events, unescape_token
from .geometry import VoxelGeometry
from .reader import (
    RunData,
    find_runs,
    load_img,
    load_run,
    neuron_masker,
    run_geometry,
    run_metadata,
)
from .validate import ValidationResult, validate

__all__ = [
    "RunData",
    "ValidationResult",
    "VoxelGeometry",
    "escape_token",
    "find_runs",
    "load_img",
    "load_run",
    "neuron_masker",
    "read_events",
    "run_geometry",
    "run_metadata",
    "unescape_token",
    "validate",
]
