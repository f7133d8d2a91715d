"""``llm2bids localize``: a localizer contrast as a BIDS App."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..bids.path import BIDSPath
from ..bids.reader import run_metadata, select_runs
from ..derivatives import check_output_dir, init_derivatives, provenance, write_img, write_table
from ..exceptions import InputError
from .localize import contrast_label, localize


def run_localize(
    bids_dir: str | Path,
    output_dir: str | Path,
    task: str,
    contrast: str = "sentence - nonword",
    participant_label: Sequence[str] | None = None,
    top_percent: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    height_control: str = "bonferroni",
    second_level: bool = False,
    hook_point: str = "mlp",
) -> dict[str, object]:
    """Localize with a contrast for each selected subject and write the derivatives.

    Writes ``contrast-<label>_stat-<z|t|effect>_statmap.nii.gz``, the selected units as a
    key-neuron TSV (``desc-<label>_keyneurons.tsv``) and per-layer counts.

    Returns
    -------
    dict
        Subject label -> :class:`~llm2bids.glm.localize.LocalizerResult`.
    """
    if not task:
        raise InputError("--task is required: the task whose conditions the contrast compares.")
    check_output_dir(bids_dir, output_dir)
    selected = select_runs(bids_dir, participant_label, [task], hook_point)
    label = contrast_label(contrast)
    results = {}
    for sub, by_task in selected.items():  # fit everything before writing anything
        results[sub] = localize(
            by_task[task], contrast, top_percent, threshold, alpha, height_control, second_level
        )
    output_dir = init_derivatives(output_dir, bids_dir)
    for sub, res in results.items():
        runs = selected[sub][task]
        base = BIDSPath(subject=sub, task=task, acquisition=hook_point, root=output_dir)
        selected_units = base.update(description=label, extension=".tsv")
        side = provenance(
            contrast=contrast,
            selection=res.selection,
            second_level=second_level,
            hrf_model=None,
            drift_model=None,
            smoothing_fwhm=None,
            noise_model="ols",
            model_id=run_metadata(runs[0]).get("ModelID", "n/a"),
        ) | {"Sources": [f"bids:raw:{os.path.relpath(r, bids_dir)}" for r in runs]}
        for stat, img in res.maps.items():
            write_img(
                base.update(contrast=label, stat=stat, suffix="statmap", extension=".nii.gz").fpath,
                nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine),
                side | {"Statistic": stat},
            )
        write_table(
            selected_units.update(suffix="keyneurons").fpath,
            res.table(),
            side | {"Description": f"Units selected by the contrast ({res.selection})."},
        )
        write_table(selected_units.update(suffix="layercounts").fpath, res.layer_counts(), side)
    return results
