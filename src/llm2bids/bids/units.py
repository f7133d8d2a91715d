"""The units of a group-level analysis: one recording of one model each.

A unit is a subject (``sub-``), or each of its sessions (``ses-``: checkpoints, revisions)
where it has them. Units of one architecture and geometry share their neurons: neuron
``(layer, j)`` is the same unit of computation in each, so maps can be compared (or tested)
neuron by neuron; other units share only the stimuli.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._docs import fill_doc
from ..exceptions import InputError
from .dataset import require_dataset
from .geometry import VoxelGeometry
from .names import strip_prefix
from .path import BIDSPath
from .reader import check_same_geometry, find_runs, run_metadata


@dataclass(frozen=True)
class Unit:
    """One recording of one model: a subject, or one of its sessions.

    Attributes
    ----------
    subject : str
    session : str or None
    runs : tuple of Path
        Its bold files of the selected tasks.
    """

    subject: str
    session: str | None
    runs: tuple[Path, ...]

    @property
    def label(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def parse_unit_label(label: str) -> tuple[str, str | None]:
    """The subject and session (or ``None``) of a unit label (``sub-X`` or ``sub-X_ses-Y``).

    Parameters
    ----------
    label : str

    Examples
    --------
    >>> parse_unit_label("sub-base_ses-step300")
    ('base', 'step300')
    """
    subject, _, session = label.partition("_")
    return strip_prefix(subject), strip_prefix(session, "ses-") if session else None


@fill_doc
def group_units(
    bids_dir: str | Path,
    participant_label: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    hook_point: str = "mlp",
) -> list[Unit]:
    """The units of the group level (see the module docstring), in dataset order.

    Parameters
    ----------
    %(bids_dir)s
    %(participant_label)s
    %(tasks_filter)s
    %(hook_point)s
    """
    bids_dir = require_dataset(bids_dir)
    wanted = {strip_prefix(p) for p in participant_label} if participant_label else None
    found: dict[tuple[str, str | None], list[Path]] = {}
    for path in find_runs(bids_dir, hook_point=hook_point):
        name = BIDSPath.from_path(path)
        if (wanted and name.subject not in wanted) or (tasks and name.task not in tasks):
            continue
        found.setdefault((name.subject, name.session), []).append(path)
    units = [Unit(sub, ses, tuple(runs)) for (sub, ses), runs in found.items()]
    if len(units) < 2:
        raise InputError(
            f"the group level compares models: it needs two subjects (or sessions) or more, "
            f"and {bids_dir} has {len(units)} matching participant(s) "
            f"{list(participant_label) if participant_label else 'any'}, task(s) "
            f"{list(tasks) if tasks else 'any'}, hook point {hook_point}. Record another "
            "model (`llm2bids record ... --subject NAME`) or use the participant level."
        )
    return units


@dataclass(frozen=True)
class Kind:
    """What makes neuron (layer, j) the same unit in two models: architecture and geometry."""

    architecture: str
    geometry: VoxelGeometry


def group_label(architecture: str, geometry: VoxelGeometry, method: str) -> str:
    """The ``desc`` of a same-neuron group's fit: ``group<arch><L>x<N><method>``.

    Parameters
    ----------
    architecture : str
        The transformers ``model_type`` (letters and digits are kept).
    geometry : VoxelGeometry
    method : str

    Examples
    --------
    >>> from llm2bids.bids.geometry import VoxelGeometry
    >>> group_label("gpt_neox", VoxelGeometry(6, 2048), "canica")
    'groupgptneox6x2048canica'
    """
    arch = "".join(c for c in architecture if c.isalnum())
    return f"group{arch}{geometry.n_layers}x{geometry.n_neurons}{method}"


def same_neuron_groups(units: list[Unit], kinds: dict | None = None) -> dict:
    """Units by architecture and geometry: those whose neuron ``(layer, j)`` is one unit.

    Parameters
    ----------
    units : list of Unit
    kinds : dict or None, default=None
        Each unit's architecture and geometry, when already read.

    Returns
    -------
    dict
        ``(architecture, geometry)`` -> its units, in order.
    """
    groups: dict = {}
    for unit in units:
        kind = kinds[unit] if kinds else unit_kind(unit)
        groups.setdefault(kind, []).append(unit)
    return groups


def unit_kind(unit: Unit) -> Kind:
    """The architecture (from the recording's sidecar) and geometry of a unit.

    Parameters
    ----------
    unit : Unit
    """
    return Kind(
        run_metadata(unit.runs[0]).get("Architecture", "na"), check_same_geometry(list(unit.runs))
    )
