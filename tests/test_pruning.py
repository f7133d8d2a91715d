import json

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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3", "gpt_neox"])
def test_uniformly_pruned_models_load_with_plain_transformers(arch, tmp_path):
    """Every layer keeping as many neurons: ``AutoModelForCausalLM.from_pretrained`` alone
    rebuilds the pruned model (logits equal to the masked model's); unequal layers load with
    ``trust_remote_code=True`` (the modeling file saved beside them) and through llm2bids,
    with the same logits; both honour ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    rng = np.random.default_rng(1)
    keep = np.zeros((3, 40), dtype=bool)
    for row in keep:
        row[rng.permutation(40)[:24]] = True
    with torch.inference_mode():
        with mask_neurons(model, keep, mode="keep"):
            masked = model(IDS).logits
        uniform = save_pruned(prune(model, keep), tiny_tokenizer(), tmp_path / "uniform")
        plain = AutoModelForCausalLM.from_pretrained(uniform).eval()
        np.testing.assert_allclose(plain(IDS).logits.numpy(), masked.numpy(), atol=1e-5)
        np.testing.assert_array_equal(
            plain(IDS).logits.numpy(), load_pruned(uniform).model(IDS).logits.numpy()
        )
        through = llm2bids.load_model(str(uniform), device="cpu", dtype="bfloat16")
        assert through.model.dtype == torch.bfloat16
        assert through.model.llm2bids_kept_neurons == prune(model, keep).llm2bids_kept_neurons
        unequal = save_pruned(prune(model, _keep()), tiny_tokenizer(), tmp_path / "unequal")
    info = json.loads((unequal / "llm2bids_pruning.json").read_text())
    assert info["LoadsWithTransformers"] is False and info["LoadsWithTrustRemoteCode"] is True
    with pytest.raises((RuntimeError, ValueError), match="size"):
        AutoModelForCausalLM.from_pretrained(unequal)  # the dense widths of config.json
    # the documented route: the modeling file saved beside the weights, named by auto_map
    remote = AutoModelForCausalLM.from_pretrained(unequal, trust_remote_code=True).eval()
    with torch.inference_mode():
        with mask_neurons(model, _keep(), mode="keep"):
            masked_unequal = model(IDS).logits
        np.testing.assert_allclose(remote(IDS).logits.numpy(), masked_unequal.numpy(), atol=1e-5)
        np.testing.assert_array_equal(
            remote(IDS).logits.numpy(), load_pruned(unequal).model(IDS).logits.numpy()
        )
    assert load_pruned(unequal, dtype="bfloat16").model.dtype == torch.bfloat16
    assert llm2bids.load_model(str(unequal), device="cpu", dtype="float16").model.dtype == (
        torch.float16
    )
    with pytest.raises(InputError, match="device_map"):
        llm2bids.load_model(str(unequal), device_map="auto")
    # replaced by a uniform model, the folder keeps no modeling file of the unequal one
    assert (unequal / "llm2bids_pruned.py").exists()
    save_pruned(prune(model, keep), tiny_tokenizer(), unequal, overwrite=True)
    assert not (unequal / "llm2bids_pruned.py").exists()
    assert "auto_map" not in json.loads((unequal / "config.json").read_text())


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
        with mask_neurons(model, target, mode="ablate", method="hook"):
            with neuron_hooks(model, lambda layer, x: after.setdefault(layer, x.clone())):
                model(IDS)
    assert torch.all(after[0][..., :10] == 0) and torch.equal(
        after[0][..., 10:], before[0][..., 10:]
    )
    for layer in (1, 2):
        assert torch.equal(after[layer], before[layer])
    assert not any(spec.down_module(model, i)._forward_pre_hooks for i in range(3))


def test_folded_mask_zeroes_only_its_layers_columns_and_restores_them_exactly():
    """The folded mask (the default for a zero fill): layer 0's masked columns of the down
    projection are zero inside the context, nothing else changes, and every weight comes back
    bit for bit, also when the context is left by an exception."""
    model = tiny_model("llama")
    spec = arch_spec(model)
    target = np.zeros((3, 40), bool)
    target[0, :10] = True
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with mask_neurons(model, target, mode="ablate"):
            weight = spec.down_module(model, 0).weight
            assert torch.all(weight[:, :10] == 0)
            torch.testing.assert_close(
                weight[:, 10:],
                original["model.layers.0.mlp.down_proj.weight"][:, 10:],
                rtol=0,
                atol=0,
            )
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
            assert changed == ["model.layers.0.mlp.down_proj.weight"]
            raise RuntimeError("inside")
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("hook_point, width", [("mlp", 40), ("mlp_out", 32)])
@pytest.mark.parametrize("mode", ["ablate", "keep"])
def test_folded_and_hooked_masks_give_the_same_logits_and_gradients(hook_point, width, mode):
    """Folded into the weights or hooked, the same numbers: logits bit for bit, and, in a
    forward pass with gradients, the same gradients (the masked weights get none)."""
    target = np.random.default_rng(3).random((3, width)) < 0.3
    results = {}
    for method in ("hook", "weights"):
        model = tiny_model("llama")
        with mask_neurons(model, target, mode, hook_point=hook_point, method=method):
            with torch.no_grad():
                logits = model(IDS).logits
            model(IDS).logits.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[method] = logits, grads
    assert torch.equal(results["hook"][0], results["weights"][0])
    assert results["hook"][1].keys() == results["weights"][1].keys()
    for name, grad in results["hook"][1].items():
        torch.testing.assert_close(results["weights"][1][name], grad, rtol=1e-5, atol=1e-7)
    masked = target if mode == "ablate" else ~target
    down = "model.layers.1.mlp.down_proj.weight"
    grad = results["weights"][1][down]
    assert torch.all((grad[:, masked[1]] if hook_point == "mlp" else grad[masked[1], :]) == 0)


def test_auto_masking_folds_a_zero_fill_and_hooks_where_folding_cannot_work():
    model = tiny_model("llama")
    spec = arch_spec(model)
    target = _keep(fraction=0.2)
    seen = {}

    def inputs(layer, x):
        seen[layer] = x.clone()

    means = np.ones((3, 40), np.float32)
    with torch.no_grad(), mask_neurons(model, target):  # zero fill: folded
        assert torch.all(spec.down_module(model, 0).weight[:, target[0]] == 0)
        with neuron_hooks(model, inputs):
            model(IDS)
        assert torch.all(seen[0][..., target[0]] != 0)  # activations left as they are
    with torch.no_grad(), mask_neurons(model, target, means=means):  # mean fill: hooked
        assert not torch.any(spec.down_module(model, 0).weight[:, target[0]] == 0)
        with neuron_hooks(model, inputs):
            model(IDS)
        assert torch.all(seen[0][..., target[0]] == 1)
    with pytest.raises(InputError, match="method='weights' cannot fold.*mean fill"):
        with mask_neurons(model, target, means=means, method="weights"):
            pass
    with pytest.raises(InputError, match="method must be one of"):
        with mask_neurons(model, target, method="fold"):
            pass


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
