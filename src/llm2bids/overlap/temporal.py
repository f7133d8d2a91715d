"""Networks of two models matched by their time courses over the same stimuli.

Two models with other widths, layers or tokenizers share no neurons, but they read the same
text: a network's time course, brought to a time axis both share (words, see
:func:`word_time_courses`), can be compared across models. :func:`match_time_courses` pairs
the networks of two models one to one (Hungarian assignment on ``|r|``, scipy) and tests each
pair against a null that keeps every time course's autocorrelation: the second model's time
courses are shifted circularly within each run, all by the same offset, and matched again.
:func:`model_similarity` summarises a matching as one number per model pair.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .._docs import fill_doc
from ..exceptions import InputError


def word_time_courses(values: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-level time courses resampled to words: each word's value is the mean of its tokens.

    The rule is the same for every tokenizer, so two models' word-level time courses over the
    same text line up word by word; tokens that belong to no word (special tokens, marked
    ``-1``) are left out.

    Parameters
    ----------
    values : ndarray, shape (n_tokens, n_networks)
        Time courses, one row per token.
    words : ndarray of int, shape (n_tokens,)
        The word each token belongs to (``-1``: none).

    Returns
    -------
    word_ids : ndarray of int, shape (n_words,)
        The words present, in increasing order.
    word_values : ndarray, shape (n_words, n_networks)
        Their mean time courses.

    Examples
    --------
    >>> import numpy as np
    >>> ids, means = word_time_courses(np.array([[0.0], [1.0], [3.0], [5.0]]),
    ...                                np.array([-1, 0, 0, 1]))
    >>> ids.tolist(), means.ravel().tolist()
    ([0, 1], [2.0, 5.0])
    """
    values = np.asarray(values, dtype=np.float64)
    words = np.asarray(words)
    if values.ndim != 2 or len(values) != len(words):
        raise InputError(
            f"values must be (n_tokens, n_networks) with one word index per token; got "
            f"{values.shape} values for {len(words)} word indices."
        )
    keep = words >= 0
    word_ids, inverse = np.unique(words[keep], return_inverse=True)
    sums = np.zeros((len(word_ids), values.shape[1]))
    np.add.at(sums, inverse, values[keep])
    counts = np.bincount(inverse, minlength=len(word_ids))[:, None]
    return word_ids, sums / counts


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)


def _shifted(values: np.ndarray, starts: np.ndarray, stops: np.ndarray, rng) -> np.ndarray:
    """``values`` shifted circularly within each run (one random offset per run)."""
    out = np.empty_like(values)
    for start, stop in zip(starts, stops):
        n = stop - start
        out[start:stop] = np.roll(values[start:stop], rng.integers(1, n) if n > 1 else 0, axis=0)
    return out


def _run_bounds(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop of each run's block of samples (samples of a run must be contiguous)."""
    change = np.flatnonzero(np.diff(runs) != 0) + 1
    starts, stops = np.r_[0, change], np.r_[change, len(runs)]
    if len(set(runs[starts].tolist())) != len(starts):
        raise InputError("the samples of each run must be contiguous (sort them by run).")
    return starts, stops


@fill_doc
def match_time_courses(
    a: np.ndarray,
    b: np.ndarray,
    runs: np.ndarray | None = None,
    n_permutations: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Match two models' networks one to one by the correlation of their time courses.

    Parameters
    ----------
    a, b : ndarray, shape (n_samples, k) and (n_samples, m)
        The two models' network time courses on the same samples (for example words, see
        :func:`word_time_courses`), in the same order.
    runs : ndarray or None, shape (n_samples,), default=None
        The run of each sample (contiguous blocks); the null shifts within runs. ``None``:
        one run.
    n_permutations : int, default=200
        Circular shifts of the null.
    %(seed)s

    Returns
    -------
    pandas.DataFrame
        One row per matched pair: ``network_a, network_b`` (from 1), ``correlation`` (signed
        Pearson r), ``null_p95`` (95th percentile of the null's best matched ``|r|``),
        ``p_value`` (``(1 + #{null >= |r|}) / (1 + n_permutations)``; against the best pair
        of each shift, so it controls the family of pairs) and ``matched`` (``p < 0.05``).
    """
    a, b = _zscore(a), _zscore(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise InputError(
            f"a and b must be (n_samples, n_networks) over the same samples; got {a.shape} "
            f"and {b.shape}."
        )
    runs = np.zeros(len(a), dtype=int) if runs is None else np.asarray(runs)
    starts, stops = _run_bounds(runs)
    n = len(a)
    corr = a.T @ b / n
    rows, cols = linear_sum_assignment(-np.abs(corr))
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for i in range(n_permutations):
        shifted = np.abs(a.T @ _shifted(b, starts, stops, rng) / n)
        r, c = linear_sum_assignment(-shifted)
        null[i] = shifted[r, c].max()
    observed = np.abs(corr[rows, cols])
    p_values = [(1 + int((null >= r).sum())) / (1 + n_permutations) for r in observed]
    return pd.DataFrame(
        {
            "network_a": rows + 1,
            "network_b": cols + 1,
            "correlation": np.round(corr[rows, cols], 4),
            "null_p95": round(float(np.quantile(null, 0.95)), 4),
            "p_value": np.round(p_values, 4),
            "matched": np.asarray(p_values) < 0.05,
        }
    )


def model_similarity(matching: pd.DataFrame) -> dict[str, float]:
    """One model pair's similarity from :func:`match_time_courses`: the share of networks
    matched beyond the null, and the mean ``|r|`` of the matched pairs (0 when none is).

    Parameters
    ----------
    matching : pandas.DataFrame
        A table returned by :func:`match_time_courses`.
    """
    matched = matching[matching["matched"]]
    return {
        "matched_share": round(len(matched) / len(matching), 4) if len(matching) else 0.0,
        "mean_matched_abs_r": round(float(matched["correlation"].abs().mean()), 4)
        if len(matched)
        else 0.0,
    }
