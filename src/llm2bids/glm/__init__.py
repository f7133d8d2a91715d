"""GLM localizers with nilearn's FirstLevelModel / SecondLevelModel."""

from .app import run_group_localize, run_localize
from .localize import (
    LocalizerResult,
    contrast_label,
    localize,
    localize_group,
    top_percent_mask,
    welch_selection,
)

__all__ = [
    "LocalizerResult",
    "contrast_label",
    "localize",
    "localize_group",
    "run_group_localize",
    "run_localize",
    "top_percent_mask",
    "welch_selection",
]
