"""Overlap and recurrence of networks across runs, tasks, seeds and models."""

from .models import compare_models, word_time_course_table, words_of_mixing
from .recurrence import (
    compare_fits,
    correlation_matrix,
    dice_matrix,
    jaccard_matrix,
    match,
    permutation_null,
    recurrence_frequency,
)
from .temporal import match_time_courses, model_similarity, word_time_courses

__all__ = [
    "compare_fits",
    "compare_models",
    "correlation_matrix",
    "dice_matrix",
    "jaccard_matrix",
    "match",
    "match_time_courses",
    "model_similarity",
    "permutation_null",
    "recurrence_frequency",
    "word_time_course_table",
    "word_time_courses",
    "words_of_mixing",
]
