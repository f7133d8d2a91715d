"""Decomposition: functional networks with nilearn's CanICA and DictLearning."""

from .networks import DEFAULT_THRESHOLD, METHODS, FunctionalNetworks, zscore_maps

__all__ = ["DEFAULT_THRESHOLD", "METHODS", "FunctionalNetworks", "zscore_maps"]
