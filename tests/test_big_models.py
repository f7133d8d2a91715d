"""Models spread over devices with accelerate's ``device_map``, here with layers offloaded to disk.

A model larger than one GPU is loaded with ``device_map="auto"``; this machine has no GPU, so
the same dispatch machinery (accelerate's hooks, weights on the meta device until their layer
runs) is exercised by offloading two of the tiny model's three layers to disk.
"""

import numpy as np
import pytest
import torch

import llm2bids
from llm2bids.bids import find_runs, load_run
from llm2bids.evaluation import mask_neurons, prune
from llm2bids.exceptions import InputError

OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """The tiny llama loaded whole on the CPU, and loaded with layers offloaded to disk."""
    path = str(tiny_dir("llama"))
    offloaded = llm2bids.load_model(
        path, device_map=OFFLOAD, offload_folder=tmp_path_factory.mktemp("offload")
    )
    return llm2bids.load_model(path, device="cpu"), offloaded


def test_offloaded_model_records_the_same_activations(models, tmp_path, valid):
    plain, offloaded = models
    assert any(p.is_meta for p in offloaded.model.parameters())  # really offloaded
    for name, lm in (("plain", plain), ("offloaded", offloaded)):
        llm2bids.record(
            tmp_path / name, model=lm, task="narrative", subject="tiny", max_tokens=64, verbose=0
        )
    valid(tmp_path / "offloaded")
    for a, b in zip(find_runs(tmp_path / "plain"), find_runs(tmp_path / "offloaded")):
        np.testing.assert_allclose(load_run(a).data, load_run(b).data, rtol=1e-5, atol=1e-6)


def test_masking_an_offloaded_model_matches_masking_it_in_memory(models):
    plain, offloaded = models
    lesion = np.random.default_rng(0).random((3, 40)) < 0.3
    ids = plain.tokenizer("The old farmer sold his cows.", return_tensors="pt").input_ids
    logits = []
    for lm in (plain, offloaded):
        with torch.inference_mode(), mask_neurons(lm, lesion):
            logits.append(lm.model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert not torch.allclose(offloaded.model(ids).logits, logits[1])  # the mask was lifted
    with pytest.raises(InputError, match="cannot fold this mask: weights are offloaded"):
        with mask_neurons(offloaded, lesion, method="weights"):  # auto hooked them above
            pass


def test_pruning_an_offloaded_model_is_refused(models):
    _, offloaded = models
    with pytest.raises(InputError, match="offloaded.*without disk offload"):
        prune(offloaded, np.ones((3, 40), bool))
