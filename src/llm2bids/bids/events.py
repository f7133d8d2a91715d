"""``events.tsv``: one row per token, with a lossless text encoding of the token.

Token strings can hold tabs, newlines and any other character, which a TSV cannot. The
``token`` column escapes them, reversibly:

- ``\\`` becomes ``\\\\``; tab, LF and CR become ``\\t``, ``\\n``, ``\\r``;
- any other control, line- or paragraph-separator character becomes ``\\xHH`` or ``\\uHHHH``;
- the empty string is written ``n/a`` (BIDS forbids empty cells), and a token whose text is
  literally ``n/a`` is written ``\\x6e/a``.

:func:`unescape_token` inverts it; ``token_id`` is the authoritative identity of the token.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from .._docs import fill_doc
from .._io import atomic_path
from .._version import __version__
from ..exceptions import DatasetError

EVENTS_COLUMNS = (
    "onset",
    "duration",
    "trial_type",
    "token",
    "token_id",
    "special",
    "position",
    "stim_file",
    "char_start",
    "char_stop",
    "word",
)

EVENTS_SIDECAR = {
    "onset": {"Description": "Token position times RepetitionTime.", "Units": "s"},
    "duration": {"Description": "One token lasts one RepetitionTime.", "Units": "s"},
    "trial_type": {
        "Description": "Condition of the token (the stimulus segment it belongs to); "
        "'special' for special tokens such as BOS."
    },
    "token": {
        "Description": "Text of the token. Backslash escapes: \\\\ \\t \\n \\r \\xHH \\uHHHH; "
        "'n/a' is the empty string and '\\x6e/a' the literal text n/a."
    },
    "token_id": {"Description": "Token id in the model's vocabulary."},
    "special": {
        "Description": "1 for special tokens (BOS and the like): outliers left out of analyses "
        "by default, like dummy scans.",
        "Levels": {"0": "ordinary token", "1": "special token"},
    },
    "position": {"Description": "Index of the token (volume) in the run, from 0."},
    "stim_file": {
        "Description": "The document the token comes from: its text file under stimuli/ "
        "(the stimulus segments joined by single spaces)."
    },
    "char_start": {
        "Description": "First character of the token in its document's text (stim_file), "
        "from 0: the tokenizer's offsets, or, for a tokenizer without them, the token's "
        "decoded text aligned to the document (a token that does not align gets an empty "
        "span, char_start = char_stop); n/a for special tokens."
    },
    "char_stop": {"Description": "One past the token's last character (see char_start)."},
    "word": {
        "Description": "Index (from 0) of the word the token belongs to in its document, a word "
        "being a run of characters without whitespace: the word of the token's first "
        "non-space character. The same text has the same words under every tokenizer, so "
        "time courses of two models resampled to words (the mean over each word's tokens) "
        "line up. n/a for special tokens, tokens of whitespace alone (or with an empty span)."
    },
}


def events_sidecar() -> dict:
    """The ``task-<label>_events.json`` describing the columns."""
    return {
        **EVENTS_SIDECAR,
        "StimulusPresentation": {
            "SoftwareName": "llm2bids",
            "SoftwareVersion": __version__,
            "Description": "Tokens are fed to the model in one forward pass; token t is volume t.",
        },
    }


_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_SIMPLE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPE_RE = re.compile(r"\\(\\|t|n|r|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in "\x85\ufeff":
        code = ord(ch)
        return (
            f"\\x{code:02x}"
            if code < 0x100
            else f"\\u{code:04x}"
            if code < 0x10000
            else f"\\U{code:08x}"
        )
    return ch


def escape_token(text: str) -> str:
    """Encode a token's text for a TSV cell (see the module docstring).

    Parameters
    ----------
    text : str
        The token's text, as the tokenizer decodes it alone.
    """
    if text == "":
        return "n/a"
    out = "".join(_escape_char(ch) for ch in text)
    return "\\x6e/a" if out == "n/a" else out


def unescape_token(cell: str) -> str:
    """Invert :func:`escape_token`.

    Parameters
    ----------
    cell : str
        A ``token`` cell of an events file.
    """
    if cell == "n/a":
        return ""

    def repl(match: re.Match) -> str:
        code = match.group(1)
        if code in _SIMPLE:
            return _SIMPLE[code]
        return chr(int(code[1:], 16))

    return _ESCAPE_RE.sub(repl, cell)


def _span_cells(stim_file, spans, words, n: int) -> dict[str, list]:
    """The ``stim_file``, ``char_start``, ``char_stop`` and ``word`` cells (``n/a`` where -1
    or unknown)."""

    def cells(values):
        if values is None:
            return ["n/a"] * n
        return ["n/a" if v < 0 else str(v) for v in np.asarray(values, dtype=np.int64).tolist()]

    spans = None if spans is None else np.asarray(spans, dtype=np.int64).reshape(n, 2)
    return {
        "stim_file": [stim_file or "n/a"] * n,
        "char_start": cells(None if spans is None else spans[:, 0]),
        "char_stop": cells(None if spans is None else spans[:, 1]),
        "word": cells(words),
    }


@fill_doc
def events_frame(
    token_ids,
    tokens: list[str],
    conditions: list[str],
    special,
    repetition_time: float = 1.0,
    spans=None,
    words=None,
    stim_file: str | None = None,
) -> pd.DataFrame:
    """Build the events table of one run.

    Parameters
    ----------
    token_ids : array-like of int
        The run's token ids, one per volume.
    tokens : list of str
        Each token decoded on its own.
    conditions : list of str
        Each token's condition (``trial_type``).
    special : array-like of bool or int
        1 for special tokens (BOS and the like), 0 otherwise.
    %(repetition_time)s
    spans : array-like of int, shape (n_tokens, 2), or None, default=None
        Each token's character span in its document (-1: none); ``None``: unknown.
    words : array-like of int or None, default=None
        Each token's word index in its document (-1: none); ``None``: unknown.
    stim_file : str or None, default=None
        The document's text file relative to ``stimuli/``; ``None``: unknown.
    """
    n = len(token_ids)
    position = np.arange(n)
    return pd.DataFrame(
        {
            "onset": position * repetition_time,
            "duration": np.full(n, repetition_time),
            "trial_type": conditions,
            "token": [escape_token(t) for t in tokens],
            "token_id": np.asarray(token_ids, dtype=np.int64),
            "special": np.asarray(special, dtype=np.int8),
            "position": position,
            **_span_cells(stim_file, spans, words, n),
        },
        columns=list(EVENTS_COLUMNS),
    )


class TokenCells:
    """The ``token`` cell of every distinct token id, decoded on its own once per recording.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Decodes each token id alone (as :func:`events_frame` takes its ``tokens``).

    Notes
    -----
    :meth:`add` decodes the ids it has not seen in one ``batch_decode`` call, in the caller's
    thread; reading cells afterwards needs no tokenizer, so writer threads never touch it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cells: dict[int, str] = {}

    def add(self, token_ids) -> None:
        """Decode and escape the ids of ``token_ids`` not seen before."""
        new = sorted(set(np.asarray(token_ids, dtype=np.int64).tolist()) - self._cells.keys())
        if new:
            texts = self.tokenizer.batch_decode([[i] for i in new])
            self._cells.update(zip(new, (escape_token(t) for t in texts)))

    def cells(self, token_ids) -> list[str]:
        """The escaped token cells of ``token_ids`` (every id must have been added)."""
        return [self._cells[i] for i in np.asarray(token_ids, dtype=np.int64).tolist()]


@fill_doc
def run_events(
    token_ids,
    cells: TokenCells,
    conditions: list[str],
    special,
    repetition_time: float = 1.0,
    spans=None,
    words=None,
    stim_file: str | None = None,
) -> dict[str, list]:
    """The columns of one run's events table, from already escaped token cells.

    The same table as :func:`events_frame`, without decoding or a DataFrame: what the
    recorder writes for every run.

    Parameters
    ----------
    token_ids : array-like of int
    cells : TokenCells
        Holds the escaped text of every id of ``token_ids``.
    conditions : list of str
    special : array-like of bool or int
    %(repetition_time)s
    spans, words : array-like of int or None, default=None
    stim_file : str or None, default=None
        As for :func:`events_frame`.
    """
    ids = np.asarray(token_ids, dtype=np.int64).tolist()
    n, rt = len(ids), float(repetition_time)
    return {  # cells as text already (what events_text writes for the frame's dtypes)
        "onset": [repr(t * rt) for t in range(n)],
        "duration": [repr(rt)] * n,
        "trial_type": list(conditions),
        "token": cells.cells(ids),
        "token_id": list(map(str, ids)),
        "special": list(map(str, np.asarray(special, dtype=np.int8).tolist())),
        "position": list(map(str, range(n))),
        **_span_cells(stim_file, spans, words, n),
    }


def events_text(table: pd.DataFrame | dict) -> str:
    """A table as TSV text: no quoting (tokens are already escaped), floats as Python writes them.

    Byte for byte what pandas' ``to_csv(sep="\t", index=False, quoting=QUOTE_NONE)`` writes
    for the events tables llm2bids builds.
    """
    if isinstance(table, pd.DataFrame):
        columns = {name: list(map(_cell, values)) for name, values in table.items()}
    else:  # columns of cells; text is written as it is
        columns = {
            name: [v if isinstance(v, str) else _cell(v) for v in values]
            for name, values in table.items()
        }
    lines = ["\t".join(columns)] + ["\t".join(row) for row in zip(*columns.values())]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def write_events(path: str | Path, table: pd.DataFrame | dict) -> Path:
    """Write an events table (a DataFrame or columns of cells) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(events_text(table))
    return Path(path)


def read_events(path: str | Path) -> pd.DataFrame:
    """Read an events table written by llm2bids; ``token`` is unescaped to the token text, and
    ``char_start``, ``char_stop`` and ``word`` are integers (``<NA>`` where ``n/a``).

    Parameters
    ----------
    path : str or Path
        The ``_events.tsv`` file.
    """
    try:
        frame = pd.read_csv(
            path,
            sep="\t",
            quoting=csv.QUOTE_NONE,
            dtype={"trial_type": str, "token": str},
            keep_default_na=False,
            na_values={"onset": ["n/a"], "duration": ["n/a"]},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"events file {path} cannot be parsed: {err}.") from err
    missing = {"onset", "duration"} - set(frame.columns)
    if missing:
        raise DatasetError(f"events file {path} lacks the required columns {sorted(missing)}.")
    if "token" in frame:
        frame["token"] = [unescape_token(c) for c in frame["token"]]
    for column in ("char_start", "char_stop", "word"):  # n/a (none) as <NA>
        if column in frame:
            frame[column] = pd.to_numeric(frame[column].replace("n/a", None)).astype("Int64")
    return frame
