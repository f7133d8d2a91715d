"""Decomposition: functional networks with nilearn's CanICA and DictLearning."""

from .app import run_networks, select_runs
from .networks import DEFAULT_THRESHOLD, METHODS, FunctionalNetworks, zscore_maps

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "FunctionalNetworks",
    "run_networks",
    "select_runs",
    "zscore_maps",
]
