import numpy as np
import pytest
import torch

import llm2bids
from llm2bids.evaluation import (
    load_pruned,
    mask_neurons,
    neuron_means,
    prune,
    random_controls,
    read_neuron_set,
    save_pruned,
)
from llm2bids.exceptions import InputError, ModelLoadError
from llm2bids.models import arch_spec, neuron_hooks, wrap_model
from llm2bids.stimuli import heldout_text
from tiny import tiny_model, tiny_tokenizer

IDS = torch.tensor([[0, 5, 17, 99, 3, 250, 42, 7, 11, 300]])


def _keep(n_layers=3, n_neurons=40, fraction=0.6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n_layers, n_neurons)) < fraction


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3", "gpt_neox"])
def test_pruned_equals_masked_keep_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    keep = _keep()
    with torch.inference_mode():
        with mask_neurons(model, keep, mode="keep"):
            masked = model(IDS).logits
        pruned = prune(model, keep)
        logits = pruned(IDS).logits
    np.testing.assert_allclose(logits.numpy(), masked.numpy(), atol=1e-5)
    removed = int((~keep).sum())
    spec = arch_spec(model)
    per_neuron = (
        sum(
            (
                getattr(spec.mlp_module(model, 0), n).weight.numel()
                + (
                    getattr(spec.mlp_module(model, 0), n).bias.numel()
                    if getattr(spec.mlp_module(model, 0), n).bias is not None
                    else 0
                )
            )
            for n in spec.up
        )
        // 40
        + spec.down_module(model, 0).weight.numel() // 40
    )
    assert _n_params(model) - _n_params(pruned) == removed * per_neuron
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "p")
    reloaded = load_pruned(tmp_path / "p")
    with torch.inference_mode():
        np.testing.assert_array_equal(reloaded.model(IDS).logits.numpy(), logits.numpy())
        # the top-level API: called like the model, tokenizer at hand
        np.testing.assert_array_equal(
            llm2bids.load_pruned(tmp_path / "p")(IDS).logits.numpy(), logits.numpy()
        )
    assert reloaded.tokenizer is not None
    assert _n_params(reloaded.model) == _n_params(pruned)
    # every command that takes --model takes a pruned folder (its config.json says dense widths)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            llm2bids.load_model(str(tmp_path / "p"), device="cpu")(IDS).logits.numpy(),
            logits.numpy(),
        )


def test_bias_compensation_equals_mean_masking(tmp_path):
    model = tiny_model("llama")
    lm = wrap_model(model, tiny_tokenizer())
    means = neuron_means(lm, heldout_text())
    keep = _keep()
    with torch.inference_mode():
        with mask_neurons(model, keep, mode="keep", means=means):
            masked = model(IDS).logits
        pruned = prune(model, keep, means=means)
        np.testing.assert_allclose(pruned(IDS).logits.numpy(), masked.numpy(), atol=1e-5)
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "p")
    with torch.inference_mode():
        np.testing.assert_allclose(
            load_pruned(tmp_path / "p").model(IDS).logits.numpy(), masked.numpy(), atol=1e-5
        )


def test_masking_layer0_touches_only_layer0():
    """Catches the late-binding bug: a mask for layer 0 must not land on any other layer."""
    model = tiny_model("llama")
    spec = arch_spec(model)
    target = np.zeros((3, 40), bool)
    target[0, :10] = True
    before, after = {}, {}
    with (
        torch.inference_mode(),
        neuron_hooks(model, lambda layer, x: before.setdefault(layer, x.clone())),
    ):
        with mask_neurons(model, target, mode="ablate"):
            with neuron_hooks(model, lambda layer, x: after.setdefault(layer, x.clone())):
                model(IDS)
    assert torch.all(after[0][..., :10] == 0) and torch.equal(
        after[0][..., 10:], before[0][..., 10:]
    )
    for layer in (1, 2):
        assert torch.equal(after[layer], before[layer])
    assert not any(spec.down_module(model, i)._forward_pre_hooks for i in range(3))


def test_masking_applies_during_generate():
    model = tiny_model("llama")
    keep = np.zeros((3, 40), bool)
    keep[:, 0] = True
    with torch.inference_mode():
        plain = model.generate(IDS, max_new_tokens=5, do_sample=False)
        with mask_neurons(model, keep, mode="keep"):
            masked = model.generate(IDS, max_new_tokens=5, do_sample=False)
        pruned = prune(model, keep).generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(masked, pruned) and not torch.equal(plain, masked)


def test_controls_match_size_per_layer():
    target = _keep(fraction=0.1)
    controls = random_controls(target, n_controls=5, seed=1)
    assert len(controls) == 5
    for c in controls:
        np.testing.assert_array_equal(c.sum(1), target.sum(1))
    assert not all(np.array_equal(controls[0], c) for c in controls[1:])


def test_bad_neuron_sets(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="different model"):
        with mask_neurons(model, np.ones((4, 40), bool)):
            pass
    with pytest.raises(InputError, match="empty"):
        with mask_neurons(model, np.zeros((3, 40), bool), mode="ablate"):
            pass
    with pytest.raises(InputError, match="nothing is kept"):
        prune(model, np.zeros((3, 40), bool))
    table = tmp_path / "k.tsv"
    table.write_text("layer\tneuron\tcomponent\tz\n5\t3\t1\t4.0\n")
    with pytest.raises(InputError, match="layer 5.*different model"):
        read_neuron_set(table, 3, 40)
    table.write_text("layer\tneuron\tcomponent\tz\n1\t3\t1\t4.0\n1\t7\t2\t4.0\n")
    np.testing.assert_array_equal(np.argwhere(read_neuron_set(table, 3, 40, component=2)), [[1, 7]])
    with pytest.raises(InputError, match="selects no neuron"):
        read_neuron_set(table, 3, 40, component=9)
    (tmp_path / "p").mkdir()
    with pytest.raises(ModelLoadError, match="per-layer sizes"):
        load_pruned(tmp_path / "p")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masking_and_pruning_on_cuda_bfloat16():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    keep = _keep()
    ids = IDS.to("cuda")
    with torch.inference_mode():
        with mask_neurons(model, keep, mode="keep"):
            masked = model(ids).logits.float()
        pruned = prune(model, keep)(ids).logits.float()
    torch.testing.assert_close(pruned, masked, atol=2e-2, rtol=2e-2)
