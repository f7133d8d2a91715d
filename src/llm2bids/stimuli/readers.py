"""Reading a user's stimuli: a text file, a folder of text files, or a TSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from ..exceptions import StimuliError
from .sets import Document, Segment, StimulusSet

DEFAULT_CONDITION = "text"


def read_stimuli(path: str | Path, task: str) -> StimulusSet:
    """Read stimuli from ``path`` as the task ``task``.

    Parameters
    ----------
    path : str or Path
        - a text file: one document (one run, split if longer than ``max_tokens``);
        - a folder: every ``*.txt`` file in it, sorted by name, one document each;
        - a ``.tsv`` file with a ``text`` column and optional ``condition`` and ``run`` columns:
          each row is a segment whose tokens get its condition (``trial_type``); rows sharing
          a ``run`` value are joined, in order, into one document; without ``run`` each row
          is its own document. Cells holding tabs, line breaks or quotes must be quoted
          with double quotes (standard CSV quoting, as ``pandas.to_csv`` writes them).
    task : str
        The task label.

    Returns
    -------
    StimulusSet
    """
    path = Path(path)
    if not path.exists():
        raise StimuliError(f"stimuli path {str(path)!r} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise StimuliError(
                f"stimuli folder {str(path)!r} holds no .txt files; put one text per .txt file."
            )
        docs = [Document(f.stem, [Segment(_read_text(f), DEFAULT_CONDITION)]) for f in files]
    elif path.suffix.lower() == ".tsv":
        docs = _read_tsv(path)
    else:
        docs = [Document(path.stem, [Segment(_read_text(path), DEFAULT_CONDITION)])]
    return StimulusSet(task, f"Reading {path.name}.", docs, "supplied by the user")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StimuliError(
            f"stimuli file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "convert it to UTF-8."
        ) from err
    except OSError as err:
        raise StimuliError(f"stimuli file {str(path)!r} cannot be read: {err}.") from err
    if not text.strip():
        raise StimuliError(f"stimuli file {str(path)!r} is empty; give it some text.")
    return text


def _read_table(path: Path) -> pd.DataFrame:
    """Every cell of a TSV exactly as written (standard CSV quoting), all as strings.

    Python's csv module, not pandas: pandas 3.0 dropped a NUL character inside a quoted field.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [row for row in csv.reader(f, delimiter="\t") if row]
    except UnicodeDecodeError as err:
        raise StimuliError(
            f"stimuli TSV {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "convert it to UTF-8."
        ) from err
    except csv.Error as err:  # Python 3.10 refuses NUL characters, for one
        raise StimuliError(
            f"stimuli TSV {str(path)!r} cannot be parsed: {err}. Remove NUL characters, and "
            "quote cells holding tabs, line breaks or quotes with double quotes."
        ) from err
    if not rows:
        raise StimuliError(f"stimuli TSV {str(path)!r} cannot be parsed: it is empty.")
    header, *body = rows
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise StimuliError(
                f"stimuli TSV {str(path)!r} cannot be parsed: row {number} has {len(row)} "
                f"cells, the header {len(header)}; quote cells holding tabs or line breaks "
                "with double quotes."
            )
    return pd.DataFrame(body, columns=header, dtype=object)


def _read_tsv(path: Path) -> list[Document]:
    frame = _read_table(path)
    if "text" not in frame.columns:
        raise StimuliError(
            f"stimuli TSV {str(path)!r} has no 'text' column (columns: {list(frame.columns)}); "
            "add a header line with 'text' and optionally 'condition' and 'run'."
        )
    frame = frame[frame["text"].str.strip() != ""]
    if frame.empty:
        raise StimuliError(f"stimuli TSV {str(path)!r} has no non-empty text rows.")
    conditions = frame["condition"] if "condition" in frame else [DEFAULT_CONDITION] * len(frame)
    conditions = [c if c.strip() else DEFAULT_CONDITION for c in conditions]
    segments = [Segment(t, c) for t, c in zip(frame["text"], conditions)]
    if "run" not in frame:
        return [Document(f"row{i + 1}", [s]) for i, s in enumerate(segments)]
    docs: dict[str, list[Segment]] = {}
    for run, seg in zip(frame["run"], segments):
        docs.setdefault(run, []).append(seg)
    return [Document(f"run{run}", segs) for run, segs in docs.items()]
