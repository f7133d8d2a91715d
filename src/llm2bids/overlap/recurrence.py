"""Do networks recur? One-to-one matching, Dice / Jaccard, and a permutation null."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .._docs import fill_doc


def dice_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Dice between boolean networks ``a`` (k, v) and ``b`` (m, v).

    Parameters
    ----------
    a, b : ndarray of bool, shape (k, v) and (m, v)
        Networks over the same neurons.
    """
    inter = a.astype(np.float64) @ b.T.astype(np.float64)
    size = a.sum(1)[:, None] + b.sum(1)[None, :]
    return np.divide(2 * inter, size, out=np.zeros_like(inter), where=size > 0)


def jaccard_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard between boolean networks.

    Parameters
    ----------
    a, b : ndarray of bool, shape (k, v) and (m, v)
        Networks over the same neurons.
    """
    inter = a.astype(np.float64) @ b.T.astype(np.float64)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Pearson correlation between maps ``a`` (k, v) and ``b`` (m, v).

    Parameters
    ----------
    a, b : ndarray, shape (k, v) and (m, v)
        Maps over the same neurons.
    """
    za = (a - a.mean(1, keepdims=True)) / np.maximum(a.std(1, keepdims=True), 1e-12)
    zb = (b - b.mean(1, keepdims=True)) / np.maximum(b.std(1, keepdims=True), 1e-12)
    return za @ zb.T / a.shape[1]


def match(
    maps_a: np.ndarray,
    maps_b: np.ndarray,
    networks_a: np.ndarray,
    networks_b: np.ndarray,
    metric: str = "correlation",
) -> pd.DataFrame:
    """Match networks of two fits one to one (Hungarian assignment, scipy).

    Parameters
    ----------
    maps_a, maps_b : ndarray, shape (k, v) and (m, v)
        z-scored component maps over the same neurons.
    networks_a, networks_b : ndarray of bool
        Thresholded networks.
    metric : {"correlation", "dice"}, default="correlation"
        What the assignment maximises: ``|spatial correlation|`` of the maps or Dice of the
        networks.

    Returns
    -------
    pandas.DataFrame
        ``component_a, component_b, correlation, dice, jaccard`` (components from 1).
    """
    corr = correlation_matrix(maps_a, maps_b)
    dice = dice_matrix(networks_a, networks_b)
    if metric == "correlation":
        score = np.abs(corr)
    elif metric == "dice":
        score = dice
    else:
        raise ValueError(f"metric must be 'correlation' or 'dice', got {metric!r}.")
    rows, cols = linear_sum_assignment(-score)
    jac = jaccard_matrix(networks_a, networks_b)
    return pd.DataFrame(
        {
            "component_a": rows + 1,
            "component_b": cols + 1,
            "correlation": np.round(corr[rows, cols], 4),
            "dice": np.round(dice[rows, cols], 4),
            "jaccard": np.round(jac[rows, cols], 4),
        }
    )


@fill_doc
def permutation_null(
    networks_a: np.ndarray, networks_b: np.ndarray, n_permutations: int = 100, seed: int = 0
) -> np.ndarray:
    """Best matched Dice of each permutation, with ``b``'s networks shuffled over neurons.

    Each network of ``b`` keeps its size but its neurons are drawn at random; the networks are
    matched again (Hungarian on Dice), and the largest matched Dice is kept. Comparing an
    observed Dice with this distribution asks whether it beats the best chance overlap.

    Parameters
    ----------
    networks_a, networks_b : ndarray of bool, shape (n_networks, n_neurons_total)
        Memberships of two decompositions of the same neurons.
    n_permutations : int, default=100
    %(seed)s
    """
    rng = np.random.default_rng(seed)
    v = networks_b.shape[1]
    best = np.empty(n_permutations)
    for i in range(n_permutations):
        perm = np.stack([row[rng.permutation(v)] for row in networks_b])
        dice = dice_matrix(networks_a, perm)
        rows, cols = linear_sum_assignment(-dice)
        best[i] = dice[rows, cols].max() if len(rows) else 0.0
    return best


@fill_doc
def compare_fits(
    maps_a, maps_b, networks_a, networks_b, n_permutations: int = 100, seed: int = 0
) -> pd.DataFrame:
    """:func:`match` plus the permutation null: ``null_dice_mean``, ``null_dice_p95``, ``p_value``.

    ``p_value`` is ``(1 + #{null >= dice}) / (1 + n_permutations)`` against the best chance
    Dice of each permutation, so it controls the family of all matched pairs.

    Parameters
    ----------
    maps_a, maps_b : ndarray, shape (n_components, n_neurons_total)
        Component maps of two decompositions of the same neurons.
    networks_a, networks_b : ndarray of bool, same shapes
        Their memberships.
    n_permutations : int, default=100
    %(seed)s
    """
    table = match(maps_a, maps_b, networks_a, networks_b)
    null = permutation_null(networks_a, networks_b, n_permutations, seed)
    table["null_dice_mean"] = round(float(null.mean()), 4)
    table["null_dice_p95"] = round(float(np.quantile(null, 0.95)), 4)
    table["p_value"] = [
        round((1 + int((null >= d).sum())) / (1 + n_permutations), 4) for d in table["dice"]
    ]
    table["recurs"] = table["p_value"] < 0.05
    return table


def recurrence_frequency(network_sets: list[np.ndarray]) -> np.ndarray:
    """Per neuron, the fraction of fits in which it belongs to any network.

    Parameters
    ----------
    network_sets : list of ndarray of bool, each (k_i, n_neurons_total)
        The networks of each fit.
    """
    member = np.stack([nets.any(axis=0) for nets in network_sets])
    return member.mean(axis=0)
