import json

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
    assert lm.tokenizer is not None
    ids = lm.tokenizer("The cat sat.", return_tensors="pt").input_ids
    assert np.isfinite(lm.model(ids).logits.detach().numpy()).all()


def test_lm_eval_is_optional_with_a_clear_error(tiny_dir):
    import importlib.util

    from llm2bids.evaluation.lmeval import run_lm_eval
    from llm2bids.exceptions import InputError

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here; this test checks the message without it")
    with pytest.raises(InputError, match=r"pip install 'llm2bids\[lmeval\]'"):
        run_lm_eval(llm2bids.load_model(str(tiny_dir("llama")), device="cpu"), ["hellaswag"])
