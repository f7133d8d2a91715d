"""BIDS labels: checking them, and accepting them with or without their entity prefix.

File names and paths are built and parsed by :class:`~llm2bids.bids.path.BIDSPath`.
"""

from __future__ import annotations

import re

from ..exceptions import InputError


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


def acquisition_label(hook_point: str) -> str:
    """The ``acq-`` label of a hook point: labels are alphanumeric.

    >>> acquisition_label("mlp_out")
    'mlpout'
    """
    return hook_point.replace("_", "")
