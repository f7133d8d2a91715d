"""Localizers: task contrasts with nilearn's GLM on LLM neurons.

Tokens have no haemodynamics: the design is built from the events with no HRF convolution
(``hrf_model=None``: each condition is an exact 0/1 indicator of its tokens) and no drift
model. Special tokens are left out of the fit with ``sample_masks``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats

from .._gc import frozen_gc
from ..bids.geometry import VoxelGeometry
from ..bids.reader import check_same_geometry, load_img, load_run, read_run_events
from ..exceptions import InputError, check_choice
from ..stimuli.runs import SPECIAL_CONDITION

logger = logging.getLogger("llm2bids.glm")

HEIGHT_CONTROLS = ("bonferroni", "fdr", "fpr")


#: nilearn ``FirstLevelModel`` arguments (the mask aside): tokens are volumes 1 s apart with
#: no haemodynamics, so no HRF convolution, no drift model, no smoothing and no scaling.
FIRST_LEVEL_OPTIONS = {
    "t_r": 1.0,
    "slice_time_ref": 0.0,
    "hrf_model": None,
    "drift_model": None,
    "smoothing_fwhm": None,
    "standardize": False,
    "signal_scaling": False,
    "noise_model": "ols",
    "minimize_memory": True,
}


@dataclass
class LocalizerResult:
    """A contrast's maps and the units it selects.

    Attributes
    ----------
    contrast : str
    maps : dict of str to nibabel.Nifti1Image
        ``"z"``, ``"t"`` and ``"effect"`` maps.
    z, t : ndarray, shape (n_neurons_total,)
        The same maps in nilearn's masker order.
    selected : ndarray of bool, shape (n_neurons_total,)
    selection : str
        How units were selected (for example ``"top 1% by t"``).
    geometry : VoxelGeometry
    files : dict of str to Path
        What :func:`~llm2bids.run_localize` wrote, by role: ``statmap-z``, ``statmap-t``,
        ``statmap-effect``, ``keyneurons``, ``layercounts`` (empty until then).
    """

    contrast: str
    maps: dict
    z: np.ndarray
    t: np.ndarray
    selected: np.ndarray
    selection: str
    geometry: VoxelGeometry
    files: dict = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Selected units in the key-neuron format: ``layer, neuron, component, z, n_networks``."""
        labels = self.geometry.labels()
        idx = np.flatnonzero(self.selected)
        frame = pd.DataFrame(
            {
                "layer": labels.layer.to_numpy()[idx],
                "neuron": labels.neuron.to_numpy()[idx],
                "component": 1,
                "z": np.round(self.z[idx], 4),
                "n_networks": 1,
            }
        )
        return frame.sort_values(["layer", "neuron"], ignore_index=True)

    def layer_counts(self) -> pd.DataFrame:
        """Selected units per layer."""
        return self.geometry.layer_counts(self.selected)


def contrast_label(contrast: str) -> str:
    """A BIDS label for a contrast: ``"sentence - nonword"`` -> ``"sentenceMinusNonword"``.

    Parameters
    ----------
    contrast : str
        A nilearn contrast expression over condition names.
    """
    words = re.sub(r"-", " Minus ", contrast)
    words = re.sub(r"\+", " Plus ", words)
    words = re.sub(r"\*", " Times ", words)
    parts = re.findall(r"[A-Za-z0-9]+", words)
    if not parts:
        raise InputError(f"contrast {contrast!r} names no condition.")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _contrast_names(contrast: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", contrast))


def _check_contrast(contrast: str, conditions: set[str]) -> None:
    from nilearn.glm.contrasts import expression_to_contrast_vector

    names = _contrast_names(contrast)
    missing = sorted(names - conditions)
    if missing:
        raise InputError(
            f"contrast {contrast!r} names {missing}, which are not conditions of these runs; "
            f"conditions (trial_type values): {sorted(conditions)}."
        )
    try:  # what nilearn will do with it, before anything is fitted
        expression_to_contrast_vector(contrast, [*sorted(conditions), "constant"])
    except (ValueError, SyntaxError) as err:
        raise InputError(
            f"contrast {contrast!r} is not a valid expression over the conditions "
            f"{sorted(conditions)} (for example 'sentence - nonword'): {str(err).splitlines()[0]}"
        ) from err


def _events_and_masks(runs: Sequence[Path]):
    """Read each run's events (checked against its volumes): events, sample masks, conditions."""
    events, masks, conditions = [], [], set()
    for run in runs:
        ev = read_run_events(run, load_img(run).shape[3])
        if "trial_type" not in ev.columns:
            raise InputError(
                f"{run.name}: its events have no trial_type column, so there are no conditions "
                "to contrast; record a task with conditions (for example --task langloc, or a "
                "stimuli TSV with a 'condition' column)."
            )
        keep = ev["special"].to_numpy() == 0 if "special" in ev else np.ones(len(ev), bool)
        keep &= ev["trial_type"].to_numpy() != SPECIAL_CONDITION
        masks.append(keep)
        events.append(ev.loc[keep, ["onset", "duration", "trial_type"]].reset_index(drop=True))
        conditions |= set(events[-1].trial_type)
    return events, masks, conditions


def localize(
    runs: Sequence[str | Path],
    contrast: str = "sentence - nonword",
    top_percent: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    height_control: str = "bonferroni",
    second_level: bool = False,
    n_jobs: int = 1,
) -> LocalizerResult:
    """Fit nilearn's GLM to the runs and select the units a contrast localizes.

    Parameters
    ----------
    runs : sequence of str or Path
        Runs of one model and task (their events give the conditions).
    contrast : str, default="sentence - nonword"
        A nilearn contrast expression over ``trial_type`` values.
    top_percent : float or None, default=None
        Select the top ``P`` percent of units by t (``0 < P <= 100``).
    threshold : float or None, default=None
        Select units with ``z >= threshold`` (``z > 0``).
    alpha : float or None, default=None
        Select units significant at ``alpha`` after ``height_control`` correction (nilearn's
        ``threshold_stats_img``, no cluster threshold: neighbouring voxels are unrelated).
        With none of the three, ``top_percent=1``.
    height_control : {"bonferroni", "fdr", "fpr"}, default="bonferroni"
    second_level : bool, default=False
        Fit each run separately and combine the runs' effect maps with nilearn's
        ``SecondLevelModel`` (a one-sample t-test across runs) instead of a fixed-effects
        first-level model over all runs.
    n_jobs : int, default=1
        Processes for nilearn's per-run GLM fits (``-1``: all cores, or every Dask worker
        inside :func:`llm2bids.dask_cluster`); results do not depend on it.

    Returns
    -------
    LocalizerResult
    """
    top_percent = _check_selection(top_percent, threshold, alpha, height_control)
    geometry, imgs, events, masks = _design(runs, contrast)
    mask_img = geometry.mask_img()
    maps = _fit_contrast(imgs, events, masks, contrast, mask_img, second_level, n_jobs)
    return _result(
        contrast, maps, geometry, mask_img, (top_percent, threshold, alpha, height_control)
    )


def localize_group(  # noqa: PLR0913 (public: the selection rules, as localize)
    unit_runs: Sequence[Sequence[str | Path]],
    contrast: str = "sentence - nonword",
    top_percent: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    height_control: str = "bonferroni",
    n_jobs: int = 1,
) -> LocalizerResult:
    """A localizer over models: a one-sample t-test of their contrast effects.

    Each model's (or session's) effect map of ``contrast`` comes from a first-level model
    over its runs (fixed effects); nilearn's ``SecondLevelModel`` tests them across models.
    The models must share their neurons (one architecture and geometry).

    Parameters
    ----------
    unit_runs : sequence of sequences of str or Path
        The runs of each model (two models or more).
    contrast, top_percent, threshold, alpha, height_control, n_jobs
        As :func:`localize`.

    Returns
    -------
    LocalizerResult
    """
    top_percent = _check_selection(top_percent, threshold, alpha, height_control)
    if len(unit_runs) < 2:
        raise InputError(
            f"a second-level localizer needs two models or more, got {len(unit_runs)}."
        )
    designs = [_design(runs, contrast) for runs in unit_runs]
    geometry = check_same_geometry([Path(runs[0]) for runs in unit_runs])
    mask_img = geometry.mask_img()
    with _quiet_glm(), frozen_gc():
        effects = [
            _effect(imgs, events, masks, contrast, mask_img, n_jobs)
            for _, imgs, events, masks in designs
        ]
    maps = _one_sample(effects, mask_img)
    return _result(
        contrast, maps, geometry, mask_img, (top_percent, threshold, alpha, height_control)
    )


def _result(contrast, maps, geometry, mask_img, rule) -> LocalizerResult:
    """The result of a contrast's maps: the units the selection ``rule`` (``top_percent``,
    ``threshold``, ``alpha``, ``height_control``) keeps."""
    z = np.asarray(maps["z"].get_fdata())[geometry.mask]
    t = np.asarray(maps["t"].get_fdata())[geometry.mask]
    selected, selection = _select(maps, z, t, mask_img, *rule)
    if not selected.any():
        logger.warning("%s: no unit passes %s.", contrast, selection)
    return LocalizerResult(contrast, maps, z, t, selected, selection, geometry)


def _design(runs, contrast):
    """Geometry, image paths, events and sample masks of the runs that can estimate the
    contrast (runs lacking one of its conditions are left out, by name)."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise InputError("no runs to localize in: check the subject and task filters.")
    geometry = check_same_geometry(runs)
    events, masks, conditions = _events_and_masks(runs)
    _check_contrast(contrast, conditions)
    # A run split off a long document may lack a condition of the contrast: it says nothing
    # about the contrast and nilearn cannot estimate it there, so it is left out, by name.
    usable = [i for i, ev in enumerate(events) if _contrast_names(contrast) <= set(ev.trial_type)]
    if len(usable) < len(runs):
        skipped = [runs[i].name for i in range(len(runs)) if i not in usable]
        logger.warning(
            "left out %d run(s) lacking a condition of %r: %s",
            len(skipped),
            contrast,
            ", ".join(skipped),
        )
    if not usable:
        raise InputError(f"no run has every condition of {contrast!r}; nothing to estimate.")
    events, masks = ([x[i] for i in usable] for x in (events, masks))
    # Paths, not the opened images: nilearn keeps the data it reads on an image it is given,
    # so opened runs would all stay in memory (see decomposition.networks._part_imgs).
    imgs = [str(runs[i]) for i in usable]
    return geometry, imgs, events, masks


def _check_selection(top_percent, threshold, alpha, height_control) -> float | None:
    """Refuse a bad selection rule; the ``top_percent`` to use (1 when no rule is given)."""
    given = [x is not None for x in (top_percent, threshold, alpha)]
    if sum(given) > 1:
        raise InputError("give one of top_percent, threshold or alpha, not several.")
    if not any(given):
        top_percent = 1.0
    if top_percent is not None and not 0 < top_percent <= 100:
        raise InputError(f"top_percent must lie in (0, 100], got {top_percent}.")
    if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
        raise InputError(f"threshold must be a positive z value, got {threshold}.")
    if alpha is not None and not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}.")
    check_choice("height_control", height_control, HEIGHT_CONTROLS)
    return top_percent


def _fit_contrast(imgs, events, masks, contrast, mask_img, second_level, n_jobs) -> dict:
    """nilearn's GLM of the runs and the contrast's ``z``, ``t`` and ``effect`` maps."""
    with _quiet_glm(), frozen_gc():
        if second_level and len(imgs) >= 2:
            effects = [
                _effect(img, ev, m, contrast, mask_img, n_jobs)
                for img, ev, m in zip(imgs, events, masks)
            ]
            return _one_sample(effects, mask_img)
        if second_level:
            raise InputError("second_level needs at least two runs.")
        out = _first_level(imgs, events, masks, mask_img, n_jobs).compute_contrast(
            contrast, output_type="all"
        )
    return {"z": out["z_score"], "t": out["stat"], "effect": out["effect_size"]}


def _first_level(imgs, events, masks, mask_img, n_jobs):
    """nilearn's ``FirstLevelModel`` (:data:`FIRST_LEVEL_OPTIONS`) fitted to runs."""
    from nilearn.glm.first_level import FirstLevelModel

    options = FIRST_LEVEL_OPTIONS | {"mask_img": mask_img, "n_jobs": n_jobs}
    return FirstLevelModel(**options).fit(imgs, events=events, sample_masks=masks)


def _effect(imgs, events, masks, contrast, mask_img, n_jobs):
    """The contrast's effect map of a first-level model of the runs (fixed effects)."""
    glm = _first_level(imgs, events, masks, mask_img, n_jobs)
    return glm.compute_contrast(contrast, output_type="effect_size")


def _one_sample(effects, mask_img) -> dict:
    """nilearn's ``SecondLevelModel``: a one-sample t-test of effect maps; z, t, effect."""
    from nilearn.glm.second_level import SecondLevelModel

    design = pd.DataFrame({"intercept": np.ones(len(effects))})
    with _quiet_glm():
        second = SecondLevelModel(mask_img=mask_img, smoothing_fwhm=None).fit(
            effects, design_matrix=design
        )
        out = second.compute_contrast("intercept", output_type="all")
    return {"z": out["z_score"], "t": out["stat"], "effect": out["effect_size"]}


@contextlib.contextmanager
def _quiet_glm():
    """nilearn notices that do not apply: the mask is given on purpose, and the contrast is
    an expression over condition names, which is right for runs with different designs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*Generation of a mask has been requested")
        warnings.filterwarnings("ignore", ".*The same contrast will be used for all")
        yield


def _select(maps, z, t, mask_img, top_percent, threshold, alpha, height_control):
    """The units the rule selects, and the rule in words."""
    from nilearn.glm import threshold_stats_img

    if top_percent is not None:
        return top_percent_mask(t, top_percent), f"top {top_percent:g}% by t"
    if threshold is not None:
        return z >= threshold, f"z >= {threshold:g}"
    with warnings.catch_warnings():
        # "must not exceed <max z>": no unit passes, which the empty selection says
        warnings.filterwarnings("ignore", ".*must not exceed")
        _, cut = threshold_stats_img(
            maps["z"],
            mask_img=mask_img,
            alpha=alpha,
            height_control=height_control,
            cluster_threshold=0,
            two_sided=False,
        )
    return z >= cut, f"z >= {cut:.3f} ({height_control}-corrected alpha = {alpha:g})"


def top_percent_mask(values: np.ndarray, percent: float) -> np.ndarray:
    """The ``percent`` % largest values (at least one unit), ties broken by order.

    Parameters
    ----------
    values : ndarray
        One value per unit (for example t).
    percent : float
        In ``(0, 100]``.
    """
    n = max(1, int(round(len(values) * percent / 100)))
    selected = np.zeros(len(values), dtype=bool)
    selected[np.argsort(-values, kind="stable")[:n]] = True
    return selected


def welch_selection(
    runs: Sequence[str | Path], condition_a: str, condition_b: str, top_percent: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Welch t-test of ``condition_a`` vs ``condition_b`` token activations (scipy).

    The unit-selection method of AlKhamissi et al. (2024), "The LLM Language Network": pool
    the tokens of each condition over runs, t-test every unit, keep the top ``top_percent``.

    Parameters
    ----------
    runs : sequence of str or Path
        ``_bold`` files of one model and task.
    condition_a, condition_b : str
        ``trial_type`` values of the two conditions (``a`` minus ``b``).
    top_percent : float, default=1.0
        Percentage of units to keep, by t.

    Returns
    -------
    t : ndarray, shape (n_neurons_total,)
    selected : ndarray of bool
    """
    a, b = [], []
    for run in runs:
        data = load_run(run, drop_special=True)
        cond = data.events["trial_type"].to_numpy()
        a.append(data.data[cond == condition_a])
        b.append(data.data[cond == condition_b])
    t, _ = stats.ttest_ind(np.concatenate(a), np.concatenate(b), equal_var=False, axis=0)
    t = np.nan_to_num(t)
    return t, top_percent_mask(t, top_percent)


def stat_img(values: np.ndarray, geometry: VoxelGeometry) -> nib.Nifti1Image:
    """A 3D image of a masker-order vector."""
    data = np.zeros(geometry.shape, dtype=np.float32)
    data[geometry.mask] = values
    return nib.Nifti1Image(data, geometry.affine)
