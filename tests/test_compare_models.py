"""Networks of different models matched by their word-level time courses (issue 29's base)."""

import numpy as np
import pytest

from llm2bids.exceptions import InputError
from llm2bids.overlap import match_time_courses, model_similarity, word_time_courses


def _ar1(rng, n, phi=0.8):
    """An autocorrelated signal (AR(1)): what a circular-shift null must respect."""
    x = np.zeros(n)
    noise = rng.standard_normal(n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    return x


def _tokens_of(words_signal, rng, max_tokens_per_word, noise=0.6):
    """A "tokenizer" splitting each word into 1..max tokens; each token carries its word's
    signal plus noise; the first token is special (BOS, word -1)."""
    per_word = rng.integers(1, max_tokens_per_word + 1, size=len(words_signal))
    words = np.r_[-1, np.repeat(np.arange(len(words_signal)), per_word)]
    values = np.vstack([np.zeros(words_signal.shape[1]), words_signal[words[1:]]])
    return values + noise * rng.standard_normal(values.shape), words


def test_planted_networks_are_matched_across_tokenizations_and_nothing_else_is():
    """Two "models" with different tokenizations of the same 3 runs of text: model A has 4
    networks driven by shared word-level signals, model B has 3 of them (in another order)
    and 2 of its own. Every planted pair is matched, no unplanted network is, and the models
    are closer than A and an unrelated model."""
    rng = np.random.default_rng(0)
    n_words, n_runs = 400, 3
    shared = np.column_stack([_ar1(rng, n_runs * n_words) for _ in range(4)])
    own_b = np.column_stack([_ar1(rng, n_runs * n_words) for _ in range(2)])
    signal_a = shared
    signal_b = np.column_stack([shared[:, 2], own_b[:, 0], shared[:, 0], shared[:, 3], own_b[:, 1]])
    word_rows = {"a": [], "b": []}
    for run in range(n_runs):
        words = slice(run * n_words, (run + 1) * n_words)
        for name, signal, longest in (("a", signal_a, 2), ("b", signal_b, 3)):
            tokens, token_words = _tokens_of(signal[words], rng, longest)
            ids, values = word_time_courses(tokens, token_words)
            assert ids.tolist() == list(range(n_words))  # every word, in order
            word_rows[name].append(values)
    a, b = np.vstack(word_rows["a"]), np.vstack(word_rows["b"])
    runs = np.repeat(np.arange(n_runs), n_words)
    table = match_time_courses(a, b, runs, n_permutations=200, seed=0)
    pairs = {(int(r.network_a), int(r.network_b)) for r in table[table.matched].itertuples()}
    assert pairs == {(3, 1), (1, 3), (4, 4)}  # planted: A3~B1, A1~B3, A4~B4
    assert table[table.matched].correlation.abs().min() > 0.5
    unrelated = np.column_stack([_ar1(rng, n_runs * n_words) for _ in range(5)])
    null_table = match_time_courses(a, unrelated, runs, n_permutations=200, seed=0)
    assert not null_table.matched.any()  # autocorrelated but unrelated: nothing passes
    related, apart = model_similarity(table), model_similarity(null_table)
    assert related["matched_share"] == 0.75 and apart["matched_share"] == 0.0
    assert related["mean_matched_abs_r"] > 0.5
    assert apart["mean_matched_abs_r"] == 0.0


def test_time_course_inputs_are_checked():
    with pytest.raises(InputError, match="same samples"):
        match_time_courses(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(InputError, match="contiguous"):
        rng = np.random.default_rng(0)
        match_time_courses(rng.random((6, 1)), rng.random((6, 1)), np.array([0, 0, 1, 1, 0, 0]))
    with pytest.raises(InputError, match="one word index per token"):
        word_time_courses(np.zeros((4, 1)), np.zeros(3, dtype=int))
