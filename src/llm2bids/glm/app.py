"""``llm2bids localize``: a localizer contrast as a BIDS App."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .._docs import fill_doc
from .._parallel import cluster_n_jobs, dask_cluster
from ..bids.names import acquisition_label
from ..bids.path import BIDSPath
from ..bids.reader import run_metadata, select_runs
from ..bids.units import group_label, group_units, same_neuron_groups
from ..derivatives import (
    bids_uri,
    check_output_dir,
    init_derivatives,
    provenance,
    write_img,
    write_table,
)
from ..exceptions import InputError
from .localize import FIRST_LEVEL_OPTIONS, LocalizerResult, contrast_label, localize, localize_group


@fill_doc
def run_localize(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    output_dir: str | Path,
    task: str,
    *,
    contrast: str = "sentence - nonword",
    participant_label: Sequence[str] | None = None,
    top_percent: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    height_control: str = "bonferroni",
    second_level: bool = False,
    hook_point: str = "mlp",
    n_jobs: int = 1,
    dask_scheduler: str | None = None,
) -> dict[str, object]:
    """Localize with a contrast for each selected subject and write the derivatives.

    Writes ``contrast-<label>_stat-<z|t|effect>_statmap.nii.gz``, the selected units as a
    key-neuron TSV (``desc-<label>_keyneurons.tsv``) and per-layer counts.

    Parameters
    ----------
    %(bids_dir)s
    %(output_dir)s
    task : str
        The task whose conditions the contrast compares.
    contrast : str, default="sentence - nonword"
        A nilearn contrast expression over ``trial_type`` values.
    %(participant_label)s
    top_percent, threshold, alpha : float or None, default=None
        The selection, one of: the top percentage of units by t (1% when none is given), units
        with ``z >= threshold``, or units significant at ``alpha`` after ``height_control``.
    height_control : {"bonferroni", "fdr", "fpr"}, default="bonferroni"
    second_level : bool, default=False
        Fit each run, then combine their effects with nilearn's ``SecondLevelModel``.
    %(hook_point)s
    n_jobs : int, default=1
        Processes for nilearn's per-run GLM fits (``-1``: all cores).
    dask_scheduler : str or None, default=None
        Address of a running Dask scheduler: the fits run on its workers (``n_jobs`` 1 then
        means all of them).

    Returns
    -------
    dict
        Subject label -> :class:`~llm2bids.glm.localize.LocalizerResult`, whose ``files``
        are the derivatives written for it, by role.
    """
    if not task:
        raise InputError(
            "task is required (--task on the command line): the task whose conditions the "
            "contrast compares."
        )
    check_output_dir(bids_dir, output_dir)
    selected = select_runs(bids_dir, participant_label, [task], hook_point)
    label = contrast_label(contrast)
    results = {}
    n_jobs = cluster_n_jobs(n_jobs, dask_scheduler)
    with dask_cluster(dask_scheduler):
        for sub, by_task in selected.items():  # fit everything before writing anything
            results[sub] = localize(
                by_task[task],
                contrast,
                top_percent,
                threshold,
                alpha,
                height_control,
                second_level,
                n_jobs=n_jobs,
            )
    output_dir = init_derivatives(output_dir, bids_dir)
    for sub, res in results.items():
        runs = selected[sub][task]
        base = BIDSPath(
            subject=sub,
            task=task,
            acquisition=acquisition_label(hook_point),
            root=output_dir,
        )
        side = provenance(
            contrast=contrast,
            selection=res.selection,
            second_level=second_level,
            first_level=FIRST_LEVEL_OPTIONS,
            model_id=run_metadata(runs[0]).get("ModelID", "n/a"),
        ) | {"Sources": [bids_uri(r, bids_dir) for r in runs]}
        _write_localizer(res, base, label, side)
    return results


def _write_localizer(res: LocalizerResult, base: BIDSPath, label: str, side: dict) -> None:
    """A localizer's stat maps, selected units and their layer counts, named after ``base``
    (the ``desc`` of the tables is ``label``, the contrast's, after a group's label if any)."""
    desc = label if base.description is None else base.description + label
    for stat, img in res.maps.items():
        res.files[f"statmap-{stat}"] = write_img(
            base.update(contrast=label, stat=stat, suffix="statmap", extension=".nii.gz").fpath,
            nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine),
            side | {"Statistic": stat},
        )
    selected_units = base.update(description=desc, extension=".tsv")
    res.files["keyneurons"] = write_table(
        selected_units.update(suffix="keyneurons").fpath,
        res.table(),
        side | {"Description": f"Units selected by the contrast ({res.selection})."},
    )
    res.files["layercounts"] = write_table(
        selected_units.update(suffix="layercounts").fpath, res.layer_counts(), side
    )


@fill_doc
def run_group_localize(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    output_dir: str | Path,
    task: str,
    *,
    contrast: str = "sentence - nonword",
    participant_label: Sequence[str] | None = None,
    top_percent: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    height_control: str = "bonferroni",
    hook_point: str = "mlp",
    n_jobs: int = 1,
) -> dict[str, LocalizerResult]:
    """A localizer over models (the BIDS-Apps ``group`` level): nilearn's ``SecondLevelModel``.

    The units (subjects, or their sessions, see
    :func:`~llm2bids.bids.units.group_units`) of one architecture and geometry
    share their neurons: each unit's contrast effect (first level over its runs) is tested
    across the units (a one-sample t-test). Dataset-level files, named with the group's
    ``desc`` (``group<arch><L>x<N>``): ``task-<task>_acq-<hook>_desc-<group>_contrast-<label>
    _stat-<z|t|effect>_statmap.nii.gz`` and the selected units
    (``desc-<group><label>_keyneurons.tsv``, ``_layercounts.tsv``).

    Parameters
    ----------
    %(bids_dir)s
    %(output_dir)s
    task : str
        The task whose conditions the contrast compares.
    contrast : str, default="sentence - nonword"
        A nilearn contrast expression over ``trial_type`` values.
    %(participant_label)s
    top_percent, threshold, alpha : float or None, default=None
        The selection, as :func:`run_localize` makes it.
    height_control : {"bonferroni", "fdr", "fpr"}, default="bonferroni"
    %(hook_point)s
    n_jobs : int, default=1
        Processes for nilearn's first-level fits (``-1``: all cores).

    Returns
    -------
    dict of str to LocalizerResult
        Group ``desc`` label -> its result (``files``: what was written for it).
    """
    if not task:
        raise InputError("task is required (--task on the command line).")
    check_output_dir(bids_dir, output_dir)
    units = group_units(bids_dir, participant_label, [task], hook_point)
    groups = {k: m for k, m in same_neuron_groups(units).items() if len(m) > 1}
    if not groups:
        raise InputError(
            "a second-level localizer needs two models (or sessions) of one architecture and "
            f"geometry; {[u.label for u in units]} share none. Use the participant level."
        )
    label = contrast_label(contrast)
    by_label = {group_label(k.architecture, k.geometry, ""): m for k, m in groups.items()}
    results = {
        group: localize_group(
            [list(u.runs) for u in members],
            contrast,
            top_percent,
            threshold,
            alpha,
            height_control,
            n_jobs=n_jobs,
        )
        for group, members in by_label.items()
    }
    output_dir = init_derivatives(output_dir, bids_dir)
    acq = acquisition_label(hook_point)
    for group, members in by_label.items():
        res = results[group]
        side = provenance(
            contrast=contrast,
            selection=res.selection,
            units=[u.label for u in members],
            first_level=FIRST_LEVEL_OPTIONS,
            second_level="one-sample t-test across units (nilearn SecondLevelModel)",
        ) | {"Sources": [bids_uri(r, bids_dir) for u in members for r in u.runs]}
        base = BIDSPath(task=task, acquisition=acq, description=group, root=output_dir)
        _write_localizer(res, base, label, side)
    return results
