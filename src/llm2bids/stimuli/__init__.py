"""Stimuli: built-in stimulus sets, readers for a user's texts, and tokenization into runs."""

from .readers import read_stimuli
from .runs import RunStimulus, tokenize_runs
from .sets import (
    BUILTIN_SETS,
    Document,
    Segment,
    StimulusSet,
    builtin_set,
    calibration_text,
    heldout_text,
)

__all__ = [
    "BUILTIN_SETS",
    "Document",
    "RunStimulus",
    "Segment",
    "StimulusSet",
    "builtin_set",
    "calibration_text",
    "heldout_text",
    "read_stimuli",
    "tokenize_runs",
]
