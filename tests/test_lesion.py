import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import llm2bids
from llm2bids.cli.main import main
from llm2bids.evaluation import load_pruned, minimal_pairs
from llm2bids.evaluation.lesion import run_lesion


@pytest.fixture(scope="module")
def key_table(tmp_path_factory):
    path = (
        tmp_path_factory.mktemp("keys")
        / "sub-tinyllama_task-langloc_acq-mlp_desc-canica_keyneurons.tsv"
    )
    pd.DataFrame(
        {
            "layer": [0, 0, 1, 2, 2],
            "neuron": [1, 5, 7, 3, 39],
            "component": 1,
            "z": [5.0, 4.0, 3.5, 3.2, 6.0],
            "n_networks": 1,
        }
    ).to_csv(path, sep="\t", index=False)
    return path


def test_minimal_pairs_are_minimal():
    pairs = minimal_pairs()
    assert set(pairs.phenomenon) == {
        "subject_verb_agreement",
        "determiner_noun_agreement",
        "anaphor_agreement",
    }
    for good, bad in zip(pairs.good, pairs.bad):
        diff = [(a, b) for a, b in zip(good.split(), bad.split()) if a != b]
        assert len(good.split()) == len(bad.split()) and len(diff) == 1


def test_lesion_app_writes_target_and_controls(recorded, key_table, tmp_path, valid):
    out = tmp_path / "deriv"
    results = run_lesion(recorded, out, key_table, n_controls=3, verbose=0)
    table, summary = results["tinyllama"]
    assert results["tinyllama"].files["lesion"].exists()
    assert table.condition.tolist() == ["baseline", "target", "control", "control", "control"]
    assert (table.n_neurons[1:] == 5).all()
    assert table.perplexity.gt(1).all() and table.minimal_pair_accuracy.between(0, 1).all()
    path = (
        out / "sub-tinyllama/func/sub-tinyllama_task-langloc_acq-mlp_desc-canicaAblate_lesion.tsv"
    )
    side = json.loads(path.with_name(path.name.replace(".tsv", ".json")).read_text())
    assert side["Summary"]["perplexity"]["control_mean"] > 0
    assert side["Parameters"]["perplexity_stride"] == 128
    valid(out)


def test_lesion_cli_errors(recorded, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("layer\tneuron\n9\t1\n")
    assert (
        main(["lesion", str(recorded), str(tmp_path / "o"), "participant", "--networks", str(bad)])
        == 2
    )
    assert "different model" in capsys.readouterr().err


def test_lesion_cli_mean_fill_and_protected_layers(recorded, key_table, tmp_path, capsys):
    out = tmp_path / "deriv"
    args = ["-q", "lesion", str(recorded), str(out), "participant", "--networks", str(key_table)]
    args += ["--mode", "keep", "--controls", "2"]
    assert main([*args, "--fill", "mean", "--protect-layers", "0", "-1"]) == 0
    side = next(out.rglob("*_desc-canicaKeep_lesion.json"))
    params = json.loads(side.read_text())["Parameters"]
    assert params["fill"] == "mean" and params["protected_layers"] == [0, -1]
    assert params["calibration"] == "built-in recording stimuli"
    table = pd.read_csv(side.with_suffix(".tsv"), sep="\t")
    assert (table.n_neurons[1:] == 40 + 1 + 40).all()  # layers 0 and 2 whole, 1 key neuron
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    overlap = tmp_path / "eval.txt"
    overlap.write_text(llm2bids.stimuli.calibration_text()[:2000])
    assert main([*args, "--fill", "mean", "--eval-text", str(overlap)]) == 2
    assert "share" in capsys.readouterr().err
    assert main([*args, "--protect-layers", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        main([*args, "--fill", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err
    # the refused runs left what the first one wrote exactly as it was
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_prune_refuses_mlp_output_dimensions(tiny_dir, tmp_path, capsys):
    keys = tmp_path / "sub-tinyllama_acq-mlpout_desc-canica_keyneurons.tsv"
    keys.write_text("layer\tneuron\n0\t1\n")
    args = ["prune", "--model", str(tiny_dir("llama")), "--keep", str(keys)]
    assert main([*args, "--out", str(tmp_path / "p")]) == 2
    assert "hidden-size dimensions" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_prune_cli_and_reload(tiny_dir, key_table, tmp_path):
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir("llama")),
                "--keep",
                str(key_table),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lm = load_pruned(out)
    assert [len(k) for k in lm.model.llm2bids_kept_neurons] == [2, 1, 2]
    params = json.loads((out / "llm2bids_pruning.json").read_text())["Parameters"]
    assert params["keep"] == str(key_table) and params["protected_layers"] == []
    assert params["bias_compensation"] is False and params["calibration"] is None
    assert lm.tokenizer is not None
    ids = lm.tokenizer("The cat sat.", return_tensors="pt").input_ids
    assert np.isfinite(lm.model(ids).logits.detach().numpy()).all()


def test_lm_eval_is_optional_with_a_clear_error(tiny_dir, monkeypatch):
    """Without lm-eval (hidden here when it is installed), the error says how to install it."""
    import sys

    from llm2bids.evaluation.lmeval import run_lm_eval
    from llm2bids.exceptions import InputError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'llm2bids\[lmeval\]'"):
        run_lm_eval(llm2bids.load_model(str(tiny_dir("llama")), device="cpu"), ["hellaswag"])


def test_lm_eval_local_task_scores_the_masked_model(tiny_dir, tmp_path, monkeypatch):
    """A local lm-eval task (a dict config over a JSON file, no hub) runs offline, and inside
    mask_neurons it scores the masked model: its accuracy is the one the masked model's own
    log-likelihoods give."""
    pytest.importorskip("lm_eval", reason="needs the lmeval extra: pip install 'llm2bids[lmeval]'")
    import torch

    from llm2bids.evaluation.lmeval import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = llm2bids.load_model(str(tiny_dir("llama")), device="cpu")
    rng = np.random.default_rng(0)
    items = [
        {
            "context": f"The cat {w}",
            "choices": [" sat", " ran", " is"],
            "label": int(rng.integers(3)),
        }
        for w in ("is", "was", "and", "the", "a", "of", "to", "in", "on", "it", "he", "we")
    ]
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items))
    task = {
        "task": "llm2bids_local_cloze",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }

    def own_accuracy():
        right = 0
        for item in items:
            scores = []
            for choice in item["choices"]:
                context = lm.tokenizer(item["context"], add_special_tokens=False).input_ids
                whole = lm.tokenizer(item["context"] + choice, add_special_tokens=False).input_ids
                ids = torch.tensor([whole])
                with torch.no_grad():
                    logp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
                scores.append(
                    sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole)))
                )
            right += int(np.argmax(scores) == item["label"])
        return right / len(items)

    from llm2bids.models.hooks import layer_count, neurons_per_layer

    neurons = np.zeros((layer_count(lm.model), neurons_per_layer(lm.model)[0]), dtype=bool)
    neurons[:, ::2] = True
    plain = run_lm_eval(lm, [task])["llm2bids_local_cloze"]["acc,none"]
    with llm2bids.mask_neurons(lm, neurons):
        masked = run_lm_eval(lm, [task])["llm2bids_local_cloze"]["acc,none"]
        assert masked == pytest.approx(own_accuracy())
    assert plain == pytest.approx(own_accuracy())


def test_lesion_of_a_stat_map_needs_and_records_a_threshold(recorded, tmp_path, capsys):
    from llm2bids.glm import run_localize

    deriv = tmp_path / "deriv"
    files = run_localize(recorded, deriv, task="langloc")["tinyllama"].files
    zmap = files["statmap-z"]
    args = ["-q", "lesion", str(recorded), str(deriv), "participant", "--networks", str(zmap)]
    args += ["--controls", "2"]
    assert main(args) == 2
    assert "pass a threshold" in capsys.readouterr().err
    assert main([*args, "--threshold", "1.0"]) == 0
    (side,) = deriv.rglob("*_lesion.json")
    assert json.loads(side.read_text())["Parameters"]["threshold"] == 1.0
    table = pd.read_csv(side.with_suffix(".tsv"), sep="\t")
    selected = (np.asarray(nib.load(zmap).dataobj) >= 1.0).sum()
    assert table.n_neurons.iloc[1] == selected > 0
