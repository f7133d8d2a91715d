"""The group level: several models in one dataset, compared (issue 29)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import transformers

import llm2bids
from llm2bids.bids.reader import find_runs
from llm2bids.bids.units import group_label
from llm2bids.exceptions import InputError
from llm2bids.stimuli import builtin_set
from tiny import save_tiny, tiny_tokenizer


def _fine_tune(base, folder, steps=300, seed=0):
    """``base`` trained for ``steps`` steps of next-token prediction on the built-in texts,
    at a fine-tuning learning rate (2e-5); returns the folder and the first and last losses."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor(
        tokenizer("\n\n".join(d.text for d in builtin_set("narrative").documents))["input_ids"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    model.train()
    losses = []
    for step in range(steps):
        start = (step * 32) % max(1, len(ids) - 64)
        chunk = ids[start : start + 64][None]
        loss = model(input_ids=chunk, labels=chunk).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, (sum(losses[:10]) / 10, sum(losses[-10:]) / 10)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A dataset of four models: a base, its fine-tune, an unrelated seed, another
    architecture; and the group level's result on it."""
    work = tmp_path_factory.mktemp("lineage")
    base = save_tiny("llama", work / "base", seed=0)
    finetuned, (first, last) = _fine_tune(base, work / "finetuned")
    assert last < first  # it did learn
    models = {
        "base": base,
        "finetuned": finetuned,
        "seed1": save_tiny("llama", work / "seed1", seed=1),
        "gpt2": save_tiny("gpt2", work / "gpt2", seed=0),
    }
    bids = work / "bids"
    for name, folder in models.items():
        llm2bids.record(
            bids,
            model=str(folder),
            subject=name,
            task=["narrative", "langloc"],
            max_tokens=96,
            verbose=0,
        )
    out = work / "derivatives"
    result = llm2bids.run_group_networks(bids, out, n_components=4, n_permutations=100, verbose=0)
    return bids, out, result


def test_the_fine_tune_is_the_base_models_nearest(lineage):
    _, _, result = lineage
    assert result.nearest("sub-base") == "sub-finetuned"
    table = result.similarity.set_index(["unit_a", "unit_b"])
    assert len(table) == 6  # every pair of the four models
    close = table.loc[("sub-base", "sub-finetuned"), "similarity"]
    assert close > table.loc[("sub-base", "sub-seed1"), "similarity"]
    assert close > table.loc[("sub-base", "sub-gpt2"), "similarity"]
    # the same architecture and neurons: also matched by their maps; another one is not
    assert not pd.isna(table.loc[("sub-base", "sub-finetuned"), "spatial_matched_share"])
    assert pd.isna(table.loc[("sub-base", "sub-gpt2"), "spatial_matched_share"])


def test_group_derivatives_are_valid_and_indexed_by_pybids(lineage, valid):
    from bids import BIDSLayout

    bids, out, result = lineage
    valid(out)
    layout = BIDSLayout(out, validate=False, is_derivative=True)
    (similarity,) = layout.get(suffix="similarity", extension=".tsv")
    assert similarity.get_entities().get("subject") is None  # a dataset-level file
    pd.testing.assert_frame_equal(
        similarity.get_df(), result.similarity, check_dtype=False, atol=1e-4
    )
    # one same-neuron group (the three llamas): its fit at the root, a dual regression each
    geometry = llm2bids.load_run(find_runs(bids, subject="base")[0]).geometry
    label = group_label("llama", geometry, "canica")
    per_unit = layout.get(desc=label, suffix="components", extension=".nii.gz")
    assert sum("subject" not in f.entities for f in per_unit) == 1
    assert sorted(f.get_entities()["subject"] for f in per_unit if "subject" in f.entities) == [
        "base",
        "finetuned",
        "seed1",
    ]
    assert set(result.subjects) == {"sub-base", "sub-finetuned", "sub-seed1"}


def test_group_level_needs_two_units(recorded, tmp_path):
    with pytest.raises(InputError, match="needs two subjects"):
        llm2bids.run_group_networks(recorded, tmp_path / "out", n_components=2, verbose=0)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_units_that_read_no_common_task_are_refused_before_any_fit(tmp_path, tiny_dir):
    bids = tmp_path / "bids"
    for subject, task in (("a", "narrative"), ("b", "langloc")):
        llm2bids.record(bids, model=str(tiny_dir("llama")), subject=subject, task=task, verbose=0)
    with pytest.raises(InputError, match="no common task"):
        llm2bids.run_group_networks(bids, tmp_path / "out", n_components=2, verbose=0)
    assert not (tmp_path / "out").exists()


def test_group_level_from_the_command_line(lineage, tmp_path, capsys):
    from llm2bids.cli.main import main

    bids, _, result = lineage
    out = tmp_path / "cli"
    code = main(
        [
            "-q",
            "networks",
            str(bids),
            str(out),
            "group",
            "--participant-label",
            "base",
            "finetuned",
            "--n-components",
            "4",
            "--n-permutations",
            "100",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "sub-base" in printed and "sub-finetuned" in printed
    table = pd.read_csv(out / "acq-mlp_desc-canica_similarity.tsv", sep="\t")
    expected = result.similarity.set_index(["unit_a", "unit_b"]).loc[
        [("sub-base", "sub-finetuned")]
    ]
    assert table.similarity.iloc[0] == pytest.approx(expected.similarity.iloc[0], abs=1e-4)
    shutil.rmtree(out)
    # participant-level options are refused at the group level, before anything is written
    for flags in (["--scope", "layer"], ["--no-per-run"], ["--n-jobs", "2"]):
        assert main(["-q", "networks", str(bids), str(out), "group", *flags]) == 2
        assert "options of the participant level" in capsys.readouterr().err
    assert not out.exists()


# -- planted word classes, two real tokenizers --------------------------------------------
WORD_CLASSES = {  # shared by both models: what a word is, whatever its tokens
    "capital": lambda w: w[:1].isupper(),
    "punctuated": lambda w: w[-1:] in ".,;:!?",
    "long": lambda w: len(w.strip(".,;:!?\"'()")) >= 7,
}


def _smollm2_tiny(folder, width=24):
    """A tiny random llama with SmolLM2's own tokenizer (49,152 tokens) and ``width`` neurons."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm2bids.models.loading import embedded_model_path

    gguf = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=width,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _plant(bids, subject, groups: dict, seed: int) -> None:
    """Drive each neuron group of ``subject``'s runs by a word-level signal: a word class of
    ``WORD_CLASSES``, or (name ``own``) a random value per word that no other model shares."""
    import re

    import nibabel as nib
    import numpy as np

    from llm2bids.bids.events import read_events
    from llm2bids.bids.nifti import write_run
    from llm2bids.bids.reader import events_path

    rng = np.random.default_rng(seed)
    own: dict = {}
    for bold in llm2bids.find_runs(bids, subject=subject):
        run = llm2bids.load_run(bold)
        events = read_events(events_path(bold))
        block = np.asarray(run.geometry.volume_to_block(np.asarray(nib.load(bold).dataobj)))
        flat = block[:, :, : run.geometry.n_neurons].reshape(len(block), -1).copy()
        for name, neurons in groups.items():
            signal = np.zeros(len(events))
            for t, (doc, word) in enumerate(zip(events.stim_file, events.word)):
                if pd.isna(word):
                    continue
                words = re.findall(r"\S+", (bids / "stimuli" / doc).read_text())
                if name == "own":
                    own.setdefault((doc, int(word)), rng.standard_normal())
                    signal[t] = own[(doc, int(word))]
                else:
                    signal[t] = float(WORD_CLASSES[name](words[int(word)]))
            signal = (signal - signal.mean()) / max(signal.std(), 1e-9)
            flat[:, neurons] += 4 * flat[:, neurons].std(axis=0) * signal[:, None]
        block[:, :, : run.geometry.n_neurons] = flat.reshape(len(block), run.geometry.n_layers, -1)
        write_run(bold, np.ascontiguousarray(block, dtype=np.float32), run.geometry)


def test_planted_word_classes_are_matched_across_tokenizers_and_nothing_else_is(tmp_path, tiny_dir):
    """Two tiny models with different tokenizers (the tests' byte-level BPE, SmolLM2's) and
    widths (40 and 24 neurons a layer): in each, three neuron groups follow the same three
    word classes of the stimuli and one group a signal of its own. The group level matches
    every planted pair beyond the null and neither model's own network."""
    import numpy as np

    bids = tmp_path / "bids"
    folders = {"bpe": tiny_dir("llama"), "smol": _smollm2_tiny(tmp_path / "smol")}
    for subject, folder in folders.items():
        llm2bids.record(bids, model=str(folder), subject=subject, task="narrative", verbose=0)
    rng = np.random.default_rng(0)
    names = [*WORD_CLASSES, "own"]
    planted = {}
    for subject, (n_total, size, seed) in {"bpe": (120, 6, 1), "smol": (72, 5, 2)}.items():
        chosen = rng.permutation(n_total)[: size * len(names)].reshape(len(names), size)
        planted[subject] = dict(zip(names, chosen))
        _plant(bids, subject, planted[subject], seed)
    result = llm2bids.run_group_networks(
        bids, tmp_path / "out", n_components=4, n_permutations=200, verbose=0
    )
    found = {}  # subject -> planted name -> its fitted network (from 1)
    for subject in folders:
        fit = result.fits[f"sub-{subject}"]
        flat_of = fit.geometry_.masker_order  # masker position -> layer * width + neuron
        found[subject] = {}
        for name, neurons in planted[subject].items():
            at = np.isin(flat_of, neurons)
            found[subject][name] = int(np.abs(fit.components_[:, at]).mean(axis=1).argmax()) + 1
        assert len(set(found[subject].values())) == len(names)  # each group its own network
    matches = result.temporal_matches.set_index("network_a")
    for name in WORD_CLASSES:
        row = matches.loc[found["bpe"][name]]
        assert row.network_b == found["smol"][name] and row.matched, name
    assert not matches.loc[found["bpe"]["own"]].matched
    assert not matches.set_index("network_b").loc[found["smol"]["own"]].matched


def test_group_report_shows_the_similarity_and_matched_time_courses(lineage, tmp_path, valid):
    import shutil as sh

    from llm2bids.cli.main import main

    _, out, result = lineage
    copy = tmp_path / "derivatives"
    sh.copytree(out, copy)
    assert main(["-q", "report", str(copy)]) == 0
    page = (copy / "group.html").read_text()
    assert "llm2bids group report" in page and page.count("<img") >= 2  # matrix, time courses
    closest = result.similarity.sort_values("similarity", ascending=False).iloc[0]
    assert f"{closest.unit_a} and {closest.unit_b}" in page
    assert (copy / "figures" / "group" / "similarity.png").exists()
    assert not list(copy.glob("sub-*.html"))  # the units have only group-level files
    valid(copy)


def test_sessions_of_one_model_are_units_of_their_own(tmp_path):
    """Checkpoints of one model are sessions (`record --session`); the group level compares
    them as units, writes their dual regression in their session folders, and they validate."""
    # one model id ("tiny", the folder's name): checkpoints of one model
    base = save_tiny("llama", tmp_path / "step0" / "tiny", seed=0)
    late, _ = _fine_tune(base, tmp_path / "step100" / "tiny", steps=100)
    bids = tmp_path / "bids"
    for session, folder in (("step0", base), ("step100", late)):
        llm2bids.record(
            bids, model=str(folder), subject="tiny", session=session, task="narrative", verbose=0
        )
    out = tmp_path / "out"
    result = llm2bids.run_group_networks(bids, out, n_components=3, n_permutations=50, verbose=0)
    assert set(result.fits) == {"sub-tiny_ses-step0", "sub-tiny_ses-step100"}
    (row,) = result.similarity.itertuples()
    assert (row.unit_a, row.unit_b) == ("sub-tiny_ses-step0", "sub-tiny_ses-step100")
    assert not pd.isna(row.spatial_matched_share)  # one model: the same neurons
    for session in ("step0", "step100"):
        assert list((out / "sub-tiny" / f"ses-{session}" / "func").glob("*_components.nii.gz"))
    assert llm2bids.validate(out).valid
