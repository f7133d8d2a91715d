"""Decomposition: functional networks with nilearn's CanICA and DictLearning."""

from ..bids.reader import select_runs  # kept importable from here
from .app import NetworksResult, run_networks
from .group import SubjectNetworks, dual_regression
from .group_app import GroupResult, run_group_networks
from .networks import DEFAULT_THRESHOLD, METHODS, FunctionalNetworks, zscore_maps

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "FunctionalNetworks",
    "GroupResult",
    "NetworksResult",
    "SubjectNetworks",
    "dual_regression",
    "run_group_networks",
    "run_networks",
    "select_runs",
    "zscore_maps",
]
