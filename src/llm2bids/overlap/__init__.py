"""Overlap and recurrence of networks across runs, tasks and seeds."""

from .recurrence import (
    compare_fits,
    correlation_matrix,
    dice_matrix,
    jaccard_matrix,
    match,
    permutation_null,
    recurrence_frequency,
)

__all__ = [
    "compare_fits",
    "correlation_matrix",
    "dice_matrix",
    "jaccard_matrix",
    "match",
    "permutation_null",
    "recurrence_frequency",
]
