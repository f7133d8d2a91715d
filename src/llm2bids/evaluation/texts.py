"""Evaluation and calibration texts: which is which, and a check that they never overlap."""

from __future__ import annotations

import re
from pathlib import Path

from ..exceptions import InputError, check_choice
from ..stimuli import calibration_text, heldout_text
from .masking import FILLS

#: Words in a row that two texts may share before they count as overlapping.
OVERLAP_WORDS = 8


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def check_disjoint(calibration: str, evaluation: str, n: int = OVERLAP_WORDS) -> None:
    """Refuse a calibration text that shares a passage with the evaluation text.

    Means estimated on the text a model is then scored on leak the answer into the model
    (the prune command of earlier versions did exactly that). Two texts overlap when they
    share ``n`` words in a row (case and punctuation ignored).

    Parameters
    ----------
    calibration, evaluation : str
        The two texts.
    n : int, default=8
        Shared words in a row that count as overlap.

    Raises
    ------
    InputError
        Naming the first shared passage.
    """
    shared = _shingles(calibration, n) & _shingles(evaluation, n)
    if shared:
        passage = " ".join(min(shared))
        raise InputError(
            f"the calibration text and the evaluation text share {len(shared)} passage(s) of "
            f"{n} words (e.g. {passage!r}): means estimated on the evaluation text would leak "
            "it into the model. Use a calibration text that the evaluation never scores (the "
            "default is the built-in recording stimuli; the built-in evaluation text is the "
            "held-out text)."
        )


def resolve_texts(
    evaluation: str | None, calibration: str | None, fill: str
) -> tuple[str, str | None]:
    """The evaluation text and, for mean filling, the calibration text, checked disjoint.

    Parameters
    ----------
    evaluation : str or None
        The text metrics are computed on; ``None`` is the built-in held-out text.
    calibration : str or None
        The text means are taken over; ``None`` is the built-in recording stimuli.
    fill : {"zero", "mean"}
        Only mean filling needs (and checks) a calibration text.

    Returns
    -------
    tuple
        ``(evaluation, calibration)``; ``calibration`` is ``None`` unless ``fill="mean"``.

    Raises
    ------
    InputError
        For a fill that does not exist, an empty calibration text, or overlapping texts.
    """
    check_choice("fill", fill, FILLS)
    evaluation = heldout_text() if evaluation is None else evaluation
    if fill != "mean":
        return evaluation, None
    calibration = calibration_text() if calibration is None else calibration
    if not calibration.strip():
        raise InputError(
            "the calibration text is empty; mean filling needs activations to average."
        )
    check_disjoint(calibration, evaluation)
    return evaluation, calibration


def read_text_file(path: str | Path, role: str) -> str:
    """The text of a UTF-8 file, or an error naming the ``role`` it was meant for."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{role} {path} cannot be read: {err}.") from err
    if not text.strip():
        raise InputError(f"{role} {path} is empty.")
    return text


def calibration_label(used: bool, calibration_file: str | Path | None) -> str | None:
    """What a sidecar says the means came from: ``None`` when no means were taken."""
    if not used:
        return None
    return "built-in recording stimuli" if calibration_file is None else str(calibration_file)
