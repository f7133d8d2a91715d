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
from ..derivatives import (
    bids_uri,
    check_output_dir,
    init_derivatives,
    provenance,
    write_img,
    write_table,
)
from ..exceptions import InputError
from .localize import FIRST_LEVEL_OPTIONS, contrast_label, localize


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
        selected_units = base.update(description=label, extension=".tsv")
        side = provenance(
            contrast=contrast,
            selection=res.selection,
            second_level=second_level,
            first_level=FIRST_LEVEL_OPTIONS,
            model_id=run_metadata(runs[0]).get("ModelID", "n/a"),
        ) | {"Sources": [bids_uri(r, bids_dir) for r in runs]}
        for stat, img in res.maps.items():
            res.files[f"statmap-{stat}"] = write_img(
                base.update(contrast=label, stat=stat, suffix="statmap", extension=".nii.gz").fpath,
                nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine),
                side | {"Statistic": stat},
            )
        res.files["keyneurons"] = write_table(
            selected_units.update(suffix="keyneurons").fpath,
            res.table(),
            side | {"Description": f"Units selected by the contrast ({res.selection})."},
        )
        res.files["layercounts"] = write_table(
            selected_units.update(suffix="layercounts").fpath, res.layer_counts(), side
        )
    return results
