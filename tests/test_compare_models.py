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


def test_group_fit_over_subjects_and_dual_regression_find_shared_and_own_networks(tmp_path):
    """Three subjects of one geometry: groups 1-3 drive all of them, group 4 only the third.
    A group CanICA over every subject's runs recovers the four groups (Dice >= 0.9), and
    dual regression finds group 4 in the third subject's back-projection, not the others'."""
    from scipy.optimize import linear_sum_assignment

    from llm2bids.decomposition import FunctionalNetworks
    from llm2bids.decomposition.group import dual_regression
    from llm2bids.overlap import dice_matrix
    from synthetic import planted_networks, write_synthetic

    _, truth = planted_networks(n_groups=4, seed=0)
    rng = np.random.default_rng(1)
    runs_of = {}
    for subject in ("a", "b", "c"):
        runs = []
        for _ in range(3):
            sources = rng.laplace(size=(300, 4)) * (rng.random((300, 4)) < 0.3)
            if subject != "c":
                sources[:, 3] = 0  # group 4 is the third subject's own
            data = sources @ (truth * 1.0) * 3 + 0.5 * rng.standard_normal((300, 400))
            data[0] = 100.0  # BOS-like, marked special
            runs.append(data.reshape(300, 4, 100).astype(np.float32))
        runs_of[subject] = write_synthetic(tmp_path / "bids", runs, subject=subject)
    every_run = [r for runs in runs_of.values() for r in runs]
    fit = FunctionalNetworks(n_components=4, random_state=0).fit(every_run)
    truth = truth[:, fit.geometry_.masker_order]  # maps are in nilearn's masker order
    dice = dice_matrix(fit.networks_, truth)
    rows, cols = linear_sum_assignment(-dice)
    assert dice[rows, cols].min() >= 0.9, dice[rows, cols]
    own = rows[cols == 3][0]  # the group component of group 4
    for subject, runs in runs_of.items():
        back = dual_regression(fit, runs)
        assert back.maps.shape == fit.components_.shape and len(back.time_courses) == 3
        found = dice_matrix(back.networks[[own]], truth[[3]])[0, 0]
        shared = dice_matrix(back.networks, truth).max(axis=0)[:3]
        assert shared.min() >= 0.9, (subject, shared)  # the shared groups, in every subject
        strength = np.abs(back.correlation[own][truth[3]]).mean()  # group 4's neurons
        if subject == "c":
            assert found >= 0.9 and strength > 0.8, (found, strength)
        else:  # the map keeps the group's shape (circularity); the correlation says it is absent
            assert found < 0.2 and strength < 0.4, (subject, found, strength)


def test_two_models_with_different_tokenizers_meet_on_the_words_of_the_text(tmp_path, tiny_dir):
    """A model with the tests' byte-level BPE and one with a word-level tokenizer record the
    same task; their networks' time courses meet on every presented word of the stimuli, and
    a model compared with itself matches every network at r = 1."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import llm2bids
    from llm2bids.overlap import compare_models, word_time_course_table
    from llm2bids.stimuli import builtin_set

    texts = [d.text for d in builtin_set("narrative").documents]
    vocab = {w: i + 3 for i, w in enumerate(sorted({w for t in texts for w in t.split()}))}
    words = Tokenizer(models.WordLevel(vocab | {"<unk>": 0, "<bos>": 1, "<pad>": 2}, "<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab) + 3,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = tmp_path / "wordmodel"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bids, deriv = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "llm2bids"
    for model, subject in ((tiny_dir("llama"), "bpe"), (folder, "words")):
        llm2bids.record(bids, model=str(model), task="narrative", subject=subject, verbose=0)
    results = llm2bids.run_networks(bids, deriv, n_components=3, per_run=False, verbose=0)
    tables = {
        sub: word_time_course_table(result.files["mixing"][0], deriv)
        for sub, result in results.items()
    }
    presented = sum(len(re.findall(r"\S+", t)) for t in texts)
    for table in tables.values():
        assert len(table) == presented  # every word of the stimuli, under either tokenizer
    matching, similarity = compare_models(tables["bpe"], tables["words"], n_permutations=50)
    assert (matching.n_words == presented).all() and len(matching) == 3
    itself, same = compare_models(tables["bpe"], tables["bpe"], n_permutations=50)
    assert same["matched_share"] == 1.0 and np.allclose(itself.correlation.abs(), 1.0)
