"""Tokenizing a stimulus set into runs no longer than ``max_tokens``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..bids.geometry import MAX_NIFTI_AXIS
from ..exceptions import InputError
from .sets import Document, StimulusSet

SPECIAL_CONDITION = "special"


@dataclass
class RunStimulus:
    """The tokens presented in one run.

    Attributes
    ----------
    index : int
        BIDS run index (from 1).
    document : str
        Name of the document the tokens come from.
    token_ids : numpy.ndarray of int
    conditions : list of str
        ``trial_type`` of each token.
    special : numpy.ndarray of bool
        Whether each token is a special token (BOS and the like).
    """

    index: int
    document: str
    token_ids: np.ndarray
    conditions: list[str]
    special: np.ndarray

    def __len__(self) -> int:
        return len(self.token_ids)


def _segment_tokens(doc: Document, tokenizer) -> list[list[int]]:
    """Token ids of each segment (joined by a space); ``duration_of`` segments cut to length."""
    tokens = [
        tokenizer(seg.text if i == 0 else " " + seg.text, add_special_tokens=False)["input_ids"]
        for i, seg in enumerate(doc.segments)
    ]
    for i, seg in enumerate(doc.segments):
        if seg.duration_of is not None:
            tokens[i] = tokens[i][: len(tokens[seg.duration_of])]
    return tokens


def tokenize_runs(
    stimuli: StimulusSet, tokenizer, max_tokens: int = 512, prepend_bos: bool = True
) -> list[RunStimulus]:
    """Tokenize every document and split it into runs of at most ``max_tokens`` tokens.

    Segments are tokenized one by one (joined by a space), so every token has exactly one
    condition; a segment with ``duration_of`` set is cut to the token count of that segment.
    A document longer than ``max_tokens`` is split into the fewest runs of equal
    length. Each run starts with the tokenizer's BOS token (marked special) when
    ``prepend_bos`` and the tokenizer has one: the first position of a sequence carries
    outlier activations, and this makes that position a known special token.

    Parameters
    ----------
    stimuli : StimulusSet
    tokenizer : transformers tokenizer
    max_tokens : int, default=512
        Longest run, BOS included.
    prepend_bos : bool, default=True
    """
    if not isinstance(max_tokens, (int, np.integer)) or not 2 <= max_tokens <= MAX_NIFTI_AXIS:
        raise InputError(
            f"max_tokens must be an integer in [2, {MAX_NIFTI_AXIS}], got {max_tokens!r}."
        )
    bos = tokenizer.bos_token_id if prepend_bos else None
    prefix = [] if bos is None else [bos]
    room = max_tokens - len(prefix)
    runs: list[RunStimulus] = []
    for doc in stimuli.documents:
        ids: list[int] = []
        conds: list[str] = []
        for seg, seg_ids in zip(doc.segments, _segment_tokens(doc, tokenizer)):
            ids.extend(seg_ids)
            conds.extend([seg.condition] * len(seg_ids))
        if not ids:
            continue
        n_chunks = math.ceil(len(ids) / room)
        bounds = np.linspace(0, len(ids), n_chunks + 1).round().astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            token_ids = np.asarray(prefix + ids[start:stop], dtype=np.int64)
            special = np.zeros(len(token_ids), dtype=bool)
            special[: len(prefix)] = True
            all_special = set(getattr(tokenizer, "all_special_ids", []))
            special |= np.isin(token_ids, list(all_special))
            runs.append(
                RunStimulus(
                    index=len(runs) + 1,
                    document=doc.name,
                    token_ids=token_ids,
                    conditions=[SPECIAL_CONDITION] * len(prefix) + conds[start:stop],
                    special=special,
                )
            )
    if not runs:
        raise InputError(f"task {stimuli.task!r}: the stimuli produced no tokens.")
    return runs
