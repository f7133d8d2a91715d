"""Decomposition: functional networks with nilearn's CanICA and DictLearning."""

from ..bids.reader import select_runs  # kept importable from here
from .app import NetworksResult, run_networks
from .group import SubjectNetworks, dual_regression
from .networks import DEFAULT_THRESHOLD, METHODS, FunctionalNetworks, zscore_maps

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "FunctionalNetworks",
    "NetworksResult",
    "SubjectNetworks",
    "dual_regression",
    "run_networks",
    "select_runs",
    "zscore_maps",
]
