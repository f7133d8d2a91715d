"""BIDS file names and paths (entities in the specification's order)."""

from __future__ import annotations

import re
from pathlib import Path

from ..exceptions import InputError

ENTITY_ORDER = ("sub", "ses", "task", "acq", "run", "atlas", "desc")


def check_label(value: str, entity: str) -> str:
    """Return ``value`` if it is a valid BIDS label (``[a-zA-Z0-9]+``), else raise."""
    if not isinstance(value, str) or not re.fullmatch(r"[a-zA-Z0-9]+", value):
        raise InputError(
            f"{entity} label must be letters and digits only ([a-zA-Z0-9]+), got {value!r}."
        )
    return value


def strip_prefix(label: str, prefix: str = "sub-") -> str:
    """Accept a label with or without its entity prefix (``sub-gpt2`` or ``gpt2``)."""
    return label[len(prefix) :] if label.startswith(prefix) else label


def bids_name(suffix: str, extension: str = "", **entities) -> str:
    """Build ``sub-X_ses-Y_task-Z_..._<suffix><extension>`` from the entities given."""
    parts = []
    for key in ENTITY_ORDER:
        value = entities.pop(key, None)
        if value is None:
            continue
        parts.append(f"{key}-{value:02d}" if key == "run" else f"{key}-{value}")
    # Any further entities (contrast, stat, ...) follow in the order given.
    parts += [f"{k}-{v}" for k, v in entities.items() if v is not None]
    return "_".join(parts + [suffix]) + extension


def func_dir(root: str | Path, sub: str, ses: str | None = None) -> Path:
    """``<root>/sub-<sub>[/ses-<ses>]/func``."""
    path = Path(root) / f"sub-{sub}"
    if ses:
        path = path / f"ses-{ses}"
    return path / "func"


def parse_entities(name: str) -> dict[str, str]:
    """Return the ``key-value`` entities in a BIDS file name."""
    stem = name.split(".")[0]
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)
