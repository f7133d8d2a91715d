"""The papers' protocols: the published masking defect, the masking options, the replication."""

import functools
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from llm2bids.cli.main import main
from llm2bids.evaluation import mask_neurons, minimal_pairs, neuron_means, top_neurons
from llm2bids.evaluation.lesion import keep_only_curve, lesion_study
from llm2bids.evaluation.masking import protect_layers
from llm2bids.evaluation.metrics import perplexity
from llm2bids.evaluation.texts import check_disjoint
from llm2bids.exceptions import InputError
from llm2bids.models import arch_spec, wrap_model
from llm2bids.replication import PROTOCOLS, published_masking, replicate
from llm2bids.stimuli import calibration_text, heldout_text
from tiny import tiny_model, tiny_tokenizer

IDS = torch.tensor([[0, 5, 17, 99, 3, 250, 42, 7, 11, 300]])


def _reference_logits(model, masked, hook_point):
    """Zero ``masked[layer]`` in each layer with hooks registered here, one per layer."""
    spec = arch_spec(model)

    def post(layer, module, inputs, output):
        return output.masked_fill(torch.as_tensor(masked[layer]), 0.0)

    def pre(layer, module, inputs):
        return (inputs[0].masked_fill(torch.as_tensor(masked[layer]), 0.0),)

    handles = []
    for layer in range(masked.shape[0]):
        down = spec.down_module(model, layer)
        handles.append(
            down.register_forward_hook(functools.partial(post, layer))
            if hook_point == "mlp_out"
            else down.register_forward_pre_hook(functools.partial(pre, layer))
        )
    try:
        with torch.inference_mode():
            return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("hook_point", ["mlp_out", "mlp"])
@pytest.mark.parametrize("mode", ["keep", "ablate"])
def test_published_defect_applies_the_last_layers_mask_everywhere(hook_point, mode):
    model = tiny_model("llama")
    width = model.config.hidden_size if hook_point == "mlp_out" else 40
    rng = np.random.default_rng(0)
    neurons = rng.random((3, width)) < 0.3  # a different set in every layer
    masked = neurons if mode == "ablate" else ~neurons
    with torch.inference_mode():
        with mask_neurons(model, neurons, mode=mode, hook_point=hook_point):
            correct = model(IDS).logits
        with published_masking(model, neurons, mode=mode, hook_point=hook_point):
            defective = model(IDS).logits
        intact = model(IDS).logits
    # llm2bids binds each layer's own mask ...
    torch.testing.assert_close(correct, _reference_logits(model, masked, hook_point))
    # ... the emulation gives every layer the last layer's mask, which is something else
    last_everywhere = np.repeat(masked[-1:], 3, axis=0)
    torch.testing.assert_close(defective, _reference_logits(model, last_everywhere, hook_point))
    assert not torch.allclose(defective, correct, atol=1e-4)
    with torch.inference_mode():  # and every hook is gone afterwards
        torch.testing.assert_close(model(IDS).logits, intact)


def test_mean_fill_protected_layers_and_per_layer_top_k():
    model = tiny_model("llama")
    lm = wrap_model(model, tiny_tokenizer())
    keep = np.zeros((3, 40), bool)
    keep[:, :4] = True
    protected = protect_layers(keep, [0, -1], "keep")
    assert protected[0].all() and protected[2].all() and protected[1].sum() == 4
    assert not protect_layers(keep, [1], "ablate")[1].any()
    means = neuron_means(lm, calibration_text())
    assert means.shape == (3, 40)
    with torch.inference_mode(), mask_neurons(model, keep, "keep", means=means):
        filled = {}
        from llm2bids.models import neuron_hooks

        with neuron_hooks(model, lambda layer, x: filled.setdefault(layer, x.clone())):
            model(IDS)
    np.testing.assert_allclose(
        filled[1][0, :, 4:].numpy(), np.broadcast_to(means[1, 4:], (IDS.shape[1], 36)), rtol=1e-6
    )
    ranking = pd.DataFrame(
        {
            "layer": np.repeat([0, 1, 2], 40),
            "neuron": np.tile(np.arange(40), 3),
            "z": np.r_[np.full(40, 99.0), np.arange(40.0), np.arange(40.0)],
        }
    )
    global_top = top_neurons(ranking, 0.25, 3, 40)
    assert global_top[0].sum() == 30 and not global_top[1:].any()  # one layer takes it all
    per_layer = top_neurons(ranking, 0.25, 3, 40, per_layer=True)
    assert (per_layer.sum(axis=1) == 10).all() and per_layer[1, 30:].all()


def test_keep_only_curve_keeps_each_layers_top_and_names_what_is_missing(caplog):
    """Per layer, a fraction whose top neurons a short layer cannot supply is skipped with a
    warning that counts per layer; the rows kept are lesion_study's on top_neurons' set."""
    lm = wrap_model(tiny_model("llama"), tiny_tokenizer())
    ranking = pd.DataFrame(  # layer 2 ranks only 5 of its 40 neurons
        {
            "layer": np.repeat([0, 1, 2], [40, 40, 5]),
            "neuron": np.r_[np.arange(40), np.arange(40), np.arange(5)],
            "z": np.r_[np.arange(40.0), -np.arange(40.0), np.arange(5.0)],
        }
    )
    small = minimal_pairs(n_per_phenomenon=2)
    text = heldout_text()[:1500]
    curve = keep_only_curve(
        lm, ranking, [0.1, 0.25], n_controls=2, text=text, pairs=small, verbose=0, per_layer=True
    )
    assert "keep-only 0.25 skipped: it needs 10 neurons in every layer" in caplog.text
    assert "(layer 2: 5)" in caplog.text
    assert curve.condition.tolist() == ["baseline", "target", "control", "control"]
    assert curve.fraction.tolist() == [1.0, 0.1, 0.1, 0.1]
    target = top_neurons(ranking, 0.1, 3, 40, per_layer=True)
    assert (target.sum(axis=1) == 4).all() and target[1, 36:].all()  # strongest |z| kept
    direct = lesion_study(lm, target, "keep", 2, text=text, pairs=small, verbose=0)
    pd.testing.assert_frame_equal(curve.drop(columns="fraction"), direct)
    caplog.clear()
    whole = keep_only_curve(lm, ranking, [0.9], n_controls=2, text=text, pairs=small, verbose=0)
    assert whole.empty and "it needs 108 neurons and the table ranks 85" in caplog.text


def test_masking_options_refuse_bad_input():
    lm = wrap_model(tiny_model("llama"), tiny_tokenizer())
    target = np.zeros((3, 40), bool)
    target[1, :5] = True
    small = minimal_pairs(n_per_phenomenon=2)
    with pytest.raises(InputError, match="protected layer 3 is out of range.*3 layers"):
        lesion_study(lm, target, "keep", pairs=small, verbose=0, protected_layers=[0, 3])
    with pytest.raises(InputError, match="fill must be one of"):
        lesion_study(lm, target, pairs=small, verbose=0, fill="median")
    text = heldout_text()
    with pytest.raises(InputError, match="share .* passage"):
        lesion_study(
            lm, target, text=text, pairs=small, verbose=0, fill="mean", calibration_text=text[:600]
        )
    check_disjoint(calibration_text(), heldout_text())  # the built-in pair never overlaps
    with pytest.raises(InputError, match="hook_point must be one of"):
        with mask_neurons(lm.model, target, hook_point="resid"):
            pass
    with pytest.raises(InputError, match="n_controls must be at least 5"):
        replicate("unused", model=lm, n_controls=3)


def test_evaluation_is_large_enough_to_carry_a_conclusion():
    pairs = minimal_pairs()
    assert len(pairs) >= 200 and not pairs.duplicated(["good", "bad"]).any()
    lm = wrap_model(tiny_model("llama"), tiny_tokenizer())
    one = perplexity(lm, heldout_text()[:4000], batch_size=1)
    batched = perplexity(lm, heldout_text()[:4000], batch_size=4)
    assert one["n_tokens"] == batched["n_tokens"]
    assert one["perplexity"] == pytest.approx(batched["perplexity"], rel=1e-5)
    assert one["next_token_ci_low"] <= one["next_token_accuracy"] <= one["next_token_ci_high"]


def test_replicate_is_reproducible_and_reports_both_maskings(tmp_path, tiny_dir, valid):
    protocols = [replace(p, n_components=4, threshold=2.0) for p in PROTOCOLS]
    kwargs = dict(
        model=str(tiny_dir("llama")), max_tokens=96, fractions=(0.5,), protocols=protocols
    )
    first = replicate(tmp_path / "rep", verbose=0, **kwargs)
    conditions = pd.read_csv(first["conditions"], sep="\t")
    summary = pd.read_csv(first["summary"], sep="\t")
    second = replicate(tmp_path / "rep", verbose=0, **kwargs)  # same seed: same numbers
    pd.testing.assert_frame_equal(pd.read_csv(second["conditions"], sep="\t"), conditions)
    pd.testing.assert_frame_equal(pd.read_csv(second["summary"], sep="\t"), summary)
    assert (conditions.condition == "baseline").sum() == 1
    assert set(summary.masking) == {"correct", "published"}
    assert set(summary.protocol) == {"paper1", "pruning", "none"}
    assert (summary.n_controls >= 5).all() and (summary.n_pairs >= 200).all()
    assert (summary.pairs_target_ci_low <= summary.pairs_target).all()
    paper1 = conditions[conditions.protocol == "paper1"]
    assert set(paper1.hook_point) == {"mlp_out"} and set(paper1["mode"]) == {"keep", "ablate"}
    assert (tmp_path / "rep/bids/derivatives/llm2bids").is_dir()
    valid(tmp_path / "rep" / "bids")


def test_replicate_cli_states_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["replicate", "--help"])
    out = capsys.readouterr().out
    assert "default: 5" in out and "0.1 0.5" in out.replace(",", "").replace("[", "")
