"""Tokenizing a stimulus set into runs no longer than ``max_tokens``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..bids.dataset import stimulus_file
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
    spans : numpy.ndarray of int, shape (n_tokens, 2), or None
        Each token's characters ``[start, stop)`` in its document's text (``-1``: none, for
        special tokens; from the tokenizer's offsets, or aligned, see :func:`aligned_spans`).
    words : numpy.ndarray of int or None
        The index (from 0, in its document) of the word each token belongs to: the word of the
        first non-space character of its span (``-1``: none, for special tokens and tokens of
        whitespace alone; ``None``: not known). A word is a run of characters without
        whitespace, so the same text has the same words under every tokenizer.
    stim_file : str or None
        The document's text file, relative to the dataset's ``stimuli/`` folder (the spans
        index into it).
    """

    index: int
    document: str
    token_ids: np.ndarray
    conditions: list[str]
    special: np.ndarray
    spans: np.ndarray | None = None
    words: np.ndarray | None = None
    stim_file: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


def _segment_tokens(doc: Document, tokenizer) -> tuple[list[list[int]], list]:
    """Token ids of each segment (joined by a space), ``duration_of`` segments cut to length,
    and each token's character span in the document's text: the tokenizer's offsets where it
    has them (fast tokenizers), the decoded tokens aligned to the text otherwise."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    tokens, spans, start = [], [], 0
    for i, seg in enumerate(doc.segments):
        text = seg.text if i == 0 else " " + seg.text
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        tokens.append(list(encoded["input_ids"]))
        pairs = encoded["offset_mapping"] if fast else aligned_spans(text, tokens[-1], tokenizer)
        spans.append([(start + a, start + b) for a, b in pairs])
        start += len(text)
    for i, seg in enumerate(doc.segments):
        if seg.duration_of is not None:
            tokens[i] = tokens[i][: len(tokens[seg.duration_of])]
            spans[i] = spans[i][: len(tokens[i])]
    return tokens, spans


#: Characters past the current position where a decoded token is looked for in the text.
ALIGN_WINDOW = 16


def aligned_spans(text: str, token_ids, tokenizer) -> list[tuple[int, int]]:
    """Each token's ``[start, stop)`` in ``text``, by aligning its decoded text to it.

    For tokenizers without offsets (slow ones): a token's decoded text, stripped of
    whitespace, is looked for from the end of the previous token on (within
    :data:`ALIGN_WINDOW` characters, so that one token that does not decode to the text
    cannot throw the rest out). A token of whitespace alone, a partial character of a
    byte-level tokenizer, or a token not found gets an empty span (no word).

    Parameters
    ----------
    text : str
    token_ids : sequence of int
        ``text``'s tokens, in order.
    tokenizer : transformers tokenizer

    Returns
    -------
    list of tuple of int
    """
    spans, pos = [], 0
    for token in token_ids:
        core = tokenizer.decode([int(token)]).strip()
        at = text.find(core, pos, pos + len(core) + ALIGN_WINDOW) if core else -1
        if at < 0 or "\ufffd" in core:
            spans.append((pos, pos))
            continue
        spans.append((at, at + len(core)))
        pos = at + len(core)
    return spans


def _word_indices(text: str, spans: np.ndarray) -> np.ndarray:
    """The word (run of non-whitespace characters, from 0) of each span's first non-space
    character; -1 for spans of whitespace alone."""
    word_of = np.full(len(text) + 1, -1, dtype=np.int64)  # a sentinel past the end
    for k, found in enumerate(re.finditer(r"\S+", text)):
        word_of[found.start() : found.end()] = k
    # the first non-space character at or after each position (len(text) where none is)
    positions = np.where(word_of >= 0, np.arange(len(word_of)), len(text))
    first = np.minimum.accumulate(positions[::-1])[::-1]
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts = first[np.clip(spans[:, 0], 0, len(text))]
    return np.where(starts < spans[:, 1], word_of[starts], -1)


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
        seg_tokens, seg_spans = _segment_tokens(doc, tokenizer)
        for seg, seg_ids in zip(doc.segments, seg_tokens):
            ids.extend(seg_ids)
            conds.extend([seg.condition] * len(seg_ids))
        if not ids:
            continue
        spans = np.asarray([s for part in seg_spans for s in part], dtype=np.int64)
        words = _word_indices(doc.text, spans)
        n_chunks = math.ceil(len(ids) / room)
        bounds = np.linspace(0, len(ids), n_chunks + 1).round().astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            token_ids = np.asarray(prefix + ids[start:stop], dtype=np.int64)
            special = np.zeros(len(token_ids), dtype=bool)
            special[: len(prefix)] = True
            all_special = set(getattr(tokenizer, "all_special_ids", []))
            special |= np.isin(token_ids, list(all_special))
            none = np.full(len(prefix), -1, dtype=np.int64)
            run_spans = np.vstack([np.full((len(prefix), 2), -1), spans[start:stop]])
            run_words = np.concatenate([none, words[start:stop]])
            run_spans[special] = -1  # a special token stands for no text
            run_words[special] = -1
            runs.append(
                RunStimulus(
                    index=len(runs) + 1,
                    document=doc.name,
                    token_ids=token_ids,
                    conditions=[SPECIAL_CONDITION] * len(prefix) + conds[start:stop],
                    special=special,
                    spans=run_spans,
                    words=run_words,
                    stim_file=stimulus_file(stimuli.task, doc.name),
                )
            )
    if not runs:
        raise InputError(f"task {stimuli.task!r}: the stimuli produced no tokens.")
    return runs
