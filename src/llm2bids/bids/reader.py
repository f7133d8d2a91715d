"""Reading runs back: the token x neuron matrix with (layer, neuron) labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .._io import read_json
from ..exceptions import DatasetError, InputError
from .events import read_events
from .geometry import VoxelGeometry
from .names import bids_name, parse_entities, strip_prefix
from .nifti import open_run, read_volume

BOLD_SUFFIXES = ("_bold.nii", "_bold.nii.gz")


@dataclass
class RunData:
    """One run as a matrix.

    Attributes
    ----------
    data : numpy.ndarray, shape (n_tokens, n_neurons_total)
        float32; columns in nilearn's masker order (see ``labels``).
    labels : pandas.DataFrame
        One row per column: ``layer``, ``neuron``, ``x``, ``y``, ``z``.
    events : pandas.DataFrame
        The run's events (one row per token), tokens unescaped.
    geometry : VoxelGeometry
    path : Path
    metadata : dict
        The merged sidecar metadata.
    """

    data: np.ndarray
    labels: pd.DataFrame
    events: pd.DataFrame
    geometry: VoxelGeometry
    path: Path
    metadata: dict

    def by_layer(self) -> np.ndarray:
        """The activations as ``(n_tokens, n_layers, n_neurons)``."""
        out = np.empty((self.data.shape[0], self.geometry.n_total), dtype=self.data.dtype)
        out[:, self.geometry.masker_order] = self.data
        return out.reshape(self.data.shape[0], self.geometry.n_layers, self.geometry.n_neurons)


def sidecar_paths(bold: Path) -> list[Path]:
    """Sidecars that apply to ``bold`` (inheritance: dataset level first, run level last)."""
    ents = parse_entities(bold.name)
    root = bold.parents[3] if "ses" in ents else bold.parents[2]
    keep = {k: ents[k] for k in ("sub", "ses", "task", "acq") if k in ents}
    return [
        root / f"task-{ents['task']}_bold.json",
        bold.parent / bids_name("bold", ".json", **keep),
        bold.with_name(bold.name.split(".")[0] + ".json"),
    ]


def run_metadata(bold: str | Path) -> dict:
    """Merged sidecar metadata of a run."""
    meta: dict = {}
    for path in sidecar_paths(Path(bold)):
        if path.exists():
            meta.update(read_json(path))
    return meta


def run_geometry(bold: str | Path, metadata: dict | None = None) -> VoxelGeometry:
    """The voxel geometry written in a run's sidecar."""
    meta = run_metadata(bold) if metadata is None else metadata
    return VoxelGeometry.from_sidecar(meta, source=f"sidecar of {Path(bold).name}")


def events_path(bold: str | Path) -> Path:
    """The ``_events.tsv`` that belongs to a ``_bold`` file."""
    bold = Path(bold)
    stem = bold.name.split(".")[0]
    return bold.with_name(stem[: -len("_bold")] + "_events.tsv")


def find_runs(
    root: str | Path,
    subject: str | None = None,
    task: str | None = None,
    acq: str | None = "mlp",
    session: str | None = None,
) -> list[Path]:
    """Bold files of a dataset matching the filters, sorted (subject, session, task, run)."""
    root = Path(root)
    runs = []
    for path in sorted(root.glob("sub-*/**/func/*_bold.nii*")):
        if path.name.startswith("."):
            continue
        ents = parse_entities(path.name)
        if subject and ents.get("sub") != strip_prefix(subject):
            continue
        if task and ents.get("task") != task:
            continue
        if acq and ents.get("acq") != acq:
            continue
        if session and ents.get("ses") != strip_prefix(session, "ses-"):
            continue
        runs.append(path)
    return runs


def load_run(
    bold: str | Path | None = None,
    *,
    root: str | Path | None = None,
    subject: str | None = None,
    task: str | None = None,
    run: int | None = None,
    acq: str = "mlp",
    session: str | None = None,
    drop_special: bool = False,
) -> RunData:
    """Load one run as a token x neuron matrix.

    Give either the path of a ``_bold`` file, or ``root`` with ``subject``, ``task`` and
    ``run``.

    Parameters
    ----------
    bold : str or Path or None
        Path of the run's ``_bold.nii[.gz]``.
    root, subject, task, run, acq, session
        Entities that name the run in the dataset ``root``.
    drop_special : bool, default=False
        Drop the special tokens (rows with ``special == 1`` in the events).

    Returns
    -------
    RunData
        ``data`` equals what ``NiftiMasker(mask_img=geometry.mask_img())`` returns.
    """
    if bold is None:
        if root is None or subject is None or task is None or run is None:
            raise InputError("load_run needs a bold path, or root, subject, task and run.")
        matches = [
            p
            for p in find_runs(root, subject, task, acq, session)
            if int(parse_entities(p.name).get("run", -1)) == int(run)
        ]
        if not matches:
            raise DatasetError(
                f"no run {run} of sub-{strip_prefix(subject)} task-{task} acq-{acq} in {root}."
            )
        bold = matches[0]
    bold = Path(bold)
    if not bold.exists():
        raise DatasetError(f"run {bold} does not exist.")
    meta = run_metadata(bold)
    geometry = run_geometry(bold, meta)
    img = open_run(bold, geometry)
    volume = read_volume(img, bold)
    n_tokens = volume.shape[3]
    tokens = geometry.volume_to_tokens(volume).reshape(n_tokens, geometry.n_total)
    data = np.ascontiguousarray(tokens[:, geometry.masker_order])
    events = read_run_events(bold, n_tokens)
    if drop_special and "special" in events:
        keep = events["special"].to_numpy() == 0
        data, events = data[keep], events[keep].reset_index(drop=True)
    return RunData(data, geometry.labels(), events, geometry, bold, meta)


def read_run_events(bold: str | Path, n_volumes: int | None = None) -> pd.DataFrame:
    """Read a run's events, checking there is one row per volume."""
    path = events_path(bold)
    if not path.exists():
        raise DatasetError(f"{path.name} is missing: every run needs its events file.")
    events = read_events(path)
    if n_volumes is not None and len(events) != n_volumes:
        raise DatasetError(
            f"{path} has {len(events)} rows but its run has {n_volumes} volumes (one row per "
            "token is required); the file was edited or the recording is incomplete."
        )
    return events


def special_mask(bold: str | Path, n_volumes: int | None = None) -> np.ndarray:
    """Boolean per volume: True for ordinary tokens, False for special ones (a sample mask)."""
    events = read_run_events(bold, n_volumes)
    if "special" not in events:
        return np.ones(len(events), dtype=bool)
    return events["special"].to_numpy() == 0


def neuron_masker(geometry: VoxelGeometry, **kwargs):
    """A nilearn ``NiftiMasker`` on the neuron mask, with no smoothing or standardization.

    Extra keyword arguments go to ``NiftiMasker``.
    """
    from nilearn.maskers import NiftiMasker

    options = {"standardize": None, "smoothing_fwhm": None, "detrend": False}
    options.update(kwargs)
    return NiftiMasker(mask_img=geometry.mask_img(), **options).fit()


def load_img(bold: str | Path) -> nib.Nifti1Image:
    """Open a run (lazy), checking its geometry against the sidecar."""
    return open_run(bold, run_geometry(bold))
