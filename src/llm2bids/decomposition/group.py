"""Group networks back in each subject: dual regression of a group decomposition.

Models of one geometry (checkpoints, fine-tunes, masked variants of one base model) share their
neurons, so a decomposition fitted on the runs of several subjects together (CanICA is a
multi-subject method) gives group networks; :func:`dual_regression` gives each subject its own
version of every group network, as FSL's dual regression does: the group maps are regressed
on each token's activations (spatial regression: the subject's time courses), then each
neuron's activations on those time courses (temporal regression: the subject's maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bids.reader import check_same_geometry, load_run
from ..exceptions import InputError
from .networks import FunctionalNetworks, members, zscore_maps


@dataclass
class SubjectNetworks:
    """One subject's version of a group decomposition's networks.

    Attributes
    ----------
    time_courses : list of ndarray
        Per run, ``(n_tokens, n_components)``: the group maps fitted on each token (spatial
        regression; special tokens left out when the fit drops them).
    maps : ndarray, shape (n_components, n_neurons_total)
        The subject's maps (temporal regression of its standardized activations on its time
        courses), z-scored over neurons, with the group maps' signs.
    correlation : ndarray, same shape
        Each neuron's correlation with the subject's time course of each network: how
        strongly the subject expresses it there.
    networks : ndarray of bool, same shape
        The subject's members: ``maps`` past the group fit's threshold (``sided``,
        ``threshold``) where ``|correlation| >= min_correlation``.
    """

    time_courses: list[np.ndarray]
    maps: np.ndarray
    correlation: np.ndarray
    networks: np.ndarray


def _standardized(data: np.ndarray) -> np.ndarray:
    """Each neuron's time series z-scored over tokens (as CanICA's ``zscore_sample``)."""
    centered = data - data.mean(axis=0)
    std = centered.std(axis=0, ddof=1) if len(data) > 1 else np.zeros(data.shape[1])
    return np.divide(centered, std, out=np.zeros_like(centered), where=std > 0)


def check_min_correlation(min_correlation: float) -> None:
    """Refuse a ``min_correlation`` outside ``[0, 1)`` (see :func:`dual_regression`).

    Parameters
    ----------
    min_correlation : float
    """
    if not 0 <= min_correlation < 1:
        raise InputError(f"min_correlation must lie in [0, 1), got {min_correlation!r}.")


def dual_regression(
    fit: FunctionalNetworks, runs: Sequence[str | Path], min_correlation: float = 0.5
) -> SubjectNetworks:
    """Each group network of ``fit`` in the subject whose runs are ``runs``.

    Parameters
    ----------
    fit : FunctionalNetworks
        A decomposition fitted on the runs of several subjects (one geometry).
    runs : sequence of str or Path
        One subject's runs, of the fit's geometry.
    min_correlation : float, default=0.5
        Least ``|r|`` between a neuron and the subject's network time course for the neuron
        to be a member. The z-scored maps alone would not do: each time course is made from
        the very neurons it is then regressed on, so a subject's map keeps the group map's
        shape even where the subject lacks the network (white noise alone correlates at
        about ``1 / sqrt(network size)`` with such a time course).

    Returns
    -------
    SubjectNetworks
    """
    check_min_correlation(min_correlation)
    if not hasattr(fit, "components_"):
        raise InputError("dual_regression needs a fitted FunctionalNetworks (call fit first).")
    runs = [Path(r) for r in runs]
    if not runs:
        raise InputError("dual_regression needs at least one run of the subject.")
    geometry = check_same_geometry(runs)
    if geometry != fit.geometry_:
        raise InputError(
            f"the subject's runs have another geometry ({geometry.n_layers} layers x "
            f"{geometry.n_neurons} neurons) than the group fit ({fit.geometry_.n_layers} x "
            f"{fit.geometry_.n_neurons}): dual regression needs the same neurons."
        )
    group = np.asarray(fit.components_, dtype=np.float64)  # (k, V)
    pinv = np.linalg.pinv(group)  # (V, k)
    k = len(group)
    gram, cross, series = np.zeros((k, k)), np.zeros((k, group.shape[1])), []
    n_samples = 0
    for run in runs:
        loaded = load_run(run)
        data = np.asarray(loaded.data, dtype=np.float64)
        if fit.drop_special:
            data = data[loaded.events["special"].to_numpy() == 0]
        data = _standardized(data)
        courses = data @ pinv  # spatial regression
        series.append(courses)
        gram += courses.T @ courses
        cross += courses.T @ data
        n_samples += len(data)
    # temporal regression; the group maps' signs are kept
    maps = zscore_maps(np.linalg.lstsq(gram, cross, rcond=None)[0], orient=False)
    # the neurons are standardized per run (mean 0, variance 1 up to ddof), so their
    # correlation with each time course is its covariance over the time course's spread
    spread = np.sqrt(np.maximum(np.diag(gram), 1e-12) * (n_samples - len(runs)))[:, None]
    correlation = np.clip(cross / spread, -1.0, 1.0)
    networks = members(maps, fit.sided, fit.threshold) & (np.abs(correlation) >= min_correlation)
    return SubjectNetworks(series, maps, correlation, networks)
