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

EVENTS_COLUMNS = ("onset", "duration", "trial_type", "token", "token_id", "special", "position")

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
    """Encode a token's text for a TSV cell (see the module docstring)."""
    if text == "":
        return "n/a"
    out = "".join(_escape_char(ch) for ch in text)
    return "\\x6e/a" if out == "n/a" else out


def unescape_token(cell: str) -> str:
    """Invert :func:`escape_token`."""
    if cell == "n/a":
        return ""

    def repl(match: re.Match) -> str:
        code = match.group(1)
        if code in _SIMPLE:
            return _SIMPLE[code]
        return chr(int(code[1:], 16))

    return _ESCAPE_RE.sub(repl, cell)


@fill_doc
def events_frame(
    token_ids, tokens: list[str], conditions: list[str], special, repetition_time: float = 1.0
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
        },
        columns=list(EVENTS_COLUMNS),
    )


def write_events(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write an events table atomically, with no quoting (the tokens are already escaped)."""
    with atomic_path(path) as tmp:
        frame.to_csv(
            tmp, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar=None, lineterminator="\n"
        )
    return Path(path)


def read_events(path: str | Path) -> pd.DataFrame:
    """Read an events table written by llm2bids; ``token`` is unescaped to the token text."""
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
    return frame
