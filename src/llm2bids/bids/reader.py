"""Reading runs back: the token x neuron matrix with (layer, neuron) labels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .._docs import fill_doc
from .._io import read_json
from ..exceptions import DatasetError, InputError
from .dataset import require_dataset
from .events import read_events
from .geometry import VoxelGeometry
from .names import acquisition_label, strip_prefix
from .nifti import open_run, read_volume
from .path import BIDSPath

BOLD_EXTENSIONS = (".nii", ".nii.gz")


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
    run = BIDSPath.from_path(bold)
    root = bold.parents[3] if run.session else bold.parents[2]
    return [sidecar.fpath for sidecar in run.update(root=root).sidecars()]


def run_metadata(bold: str | Path) -> dict:
    """Merged sidecar metadata of a run.

    Parameters
    ----------
    bold : str or Path
        A run's ``_bold`` file; its sidecars are merged by the inheritance principle.
    """
    meta: dict = {}
    for path in sidecar_paths(Path(bold)):
        if path.exists():
            meta.update(read_json(path))
    return meta


def run_geometry(bold: str | Path, metadata: dict | None = None) -> VoxelGeometry:
    """The voxel geometry written in a run's sidecar.

    Parameters
    ----------
    bold : str or Path
        A run's ``_bold`` file.
    metadata : dict or None, default=None
        Its merged sidecar metadata, if already read (see :func:`run_metadata`).
    """
    meta = run_metadata(bold) if metadata is None else metadata
    return VoxelGeometry.from_sidecar(meta, source=f"sidecar of {Path(bold).name}")


def check_same_geometry(runs: Sequence[Path]) -> VoxelGeometry:
    """The geometry shared by all runs; a run that differs is named in the error."""
    geometries = [run_geometry(r) for r in runs]
    for run, geom in zip(runs, geometries):
        if geom != geometries[0]:
            raise DatasetError(
                f"run {run.name} has {geom.n_layers} layers x {geom.n_neurons} neurons, but "
                f"{runs[0].name} has {geometries[0].n_layers} x {geometries[0].n_neurons}; "
                "decompose runs of one model and hook point together."
            )
    return geometries[0]


def check_complete(runs: Sequence[Path]) -> None:
    """Refuse a recording some of whose runs are missing (its sidecar says how many it has).

    Parameters
    ----------
    runs : sequence of Path
        ``_bold`` files of one or more recordings (subject, session, task, hook point).
    """
    by_recording: dict[BIDSPath, dict[int, Path]] = defaultdict(dict)
    for path in runs:
        run = BIDSPath.from_path(path)
        by_recording[run.update(run=None, extension=None)][run.run] = path
    for recording, paths in by_recording.items():
        first = next(iter(paths.values()))
        expected = run_metadata(first).get("RecordingParameters", {}).get("n_runs")
        if expected is None or len(paths) >= expected:
            continue
        missing = [f"{i:02d}" for i in range(1, expected + 1) if i not in paths]
        entities = ", ".join(f"{k} {v}" for k, v in recording.entities.items())
        raise DatasetError(
            f"recording ({entities}): {len(paths)} of {expected} runs are in the dataset "
            f"(missing run {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); a "
            "recording was interrupted or its files were removed. Rerun `llm2bids record` with "
            "the same arguments to complete it."
        )


def events_path(bold: str | Path) -> Path:
    """The ``_events.tsv`` that belongs to a ``_bold`` file."""
    bold = Path(bold)
    return bold.with_name(
        BIDSPath.from_path(bold).update(suffix="events", extension=".tsv").basename
    )


def find_runs(
    root: str | Path,
    subject: str | None = None,
    task: str | None = None,
    hook_point: str | None = "mlp",
    session: str | None = None,
) -> list[Path]:
    """Bold files of a dataset matching the filters, sorted (subject, session, task, run).

    Parameters
    ----------
    root : str or Path
        The dataset.
    subject, task, session : str or None, default=None
        Filters (``sub-``/``ses-`` prefixes accepted); ``None`` matches any.
    hook_point : str or None, default="mlp"
        The ``acq-`` entity of the runs; ``None`` matches any.
    """
    query = BIDSPath(
        subject=strip_prefix(subject) if subject else None,
        session=strip_prefix(session, "ses-") if session else None,
        task=task or None,
        acquisition=acquisition_label(hook_point) if hook_point else None,
        suffix="bold",
        root=root,
    )
    return [p.fpath for p in query.match() if p.extension in BOLD_EXTENSIONS]


@fill_doc
def select_runs(
    bids_dir: str | Path,
    participant_label: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    hook_point: str = "mlp",
) -> dict[str, dict[str, list[Path]]]:
    """Runs of a dataset by subject then task, after the filters; errors when none match.

    Parameters
    ----------
    %(bids_dir)s
    %(participant_label)s
    %(tasks_filter)s
    %(hook_point)s
    """
    bids_dir = require_dataset(bids_dir)
    subjects = [strip_prefix(p) for p in participant_label] if participant_label else None
    selected: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in find_runs(bids_dir, hook_point=hook_point):
        run = BIDSPath.from_path(path)
        if subjects and run.subject not in subjects:
            continue
        if tasks and run.task not in tasks:
            continue
        selected[run.subject][run.task].append(path)
    for by_task in selected.values():
        for runs in by_task.values():
            check_complete(runs)
    if not selected:
        raise DatasetError(
            f"no runs in {bids_dir} match participant(s) {participant_label or 'any'}, task(s) "
            f"{list(tasks) if tasks else 'any'}, hook point {hook_point}; check the labels with "
            "`llm2bids validate` or list the dataset's subject folders."
        )
    return {sub: dict(tasks_) for sub, tasks_ in selected.items()}


def load_run(
    bold: str | Path | None = None,
    *,
    root: str | Path | None = None,
    subject: str | None = None,
    task: str | None = None,
    run: int | None = None,
    hook_point: str = "mlp",
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
    root, subject, task, run, hook_point, session
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
            for p in find_runs(root, subject, task, hook_point, session)
            if BIDSPath.from_path(p).run == int(run)
        ]
        if not matches:
            raise DatasetError(
                f"no run {run} of subject {strip_prefix(subject)}, task {task}, hook point "
                f"{hook_point} in {root}."
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

    Parameters
    ----------
    geometry : VoxelGeometry
        The runs' geometry (see :func:`run_geometry`).
    **kwargs
        Passed to ``NiftiMasker``.

    Extra keyword arguments go to ``NiftiMasker``.
    """
    from nilearn.maskers import NiftiMasker

    options = {"standardize": None, "smoothing_fwhm": None, "detrend": False}
    options.update(kwargs)
    return NiftiMasker(mask_img=geometry.mask_img(), **options).fit()


def load_img(bold: str | Path) -> nib.Nifti1Image:
    """Open a run (lazy), checking its geometry against the sidecar.

    Parameters
    ----------
    bold : str or Path
        A run's ``_bold`` file.
    """
    return open_run(bold, run_geometry(bold))
