import json

import numpy as np
import pandas as pd
import pytest
import torch
from bids import BIDSLayout

import llm2bids
from llm2bids.bids import find_runs, load_img, load_run, neuron_masker, read_events
from llm2bids.exceptions import (
    DiskSpaceError,
    InputError,
    ModelLoadError,
    ParameterClashError,
    StimuliError,
    UnsupportedArchitectureError,
)
from llm2bids.models import arch_spec, neuron_hooks, wrap_model
from llm2bids.stimuli import builtin_set, tokenize_runs
from tiny import direct_activations, tiny_model, tiny_tokenizer


@pytest.mark.parametrize(
    "arch, dtype",
    [("llama", "float32"), ("gpt2", "float32"), ("opt", "float32"), ("llama", "bfloat16")],
)
def test_round_trip_is_exact(tmp_path, tiny_dir, arch, dtype):
    """(layer, neuron, token) -> (x, y, z, t) -> value equals the hooked activation exactly.

    In bfloat16 the written float32 values are the model's bfloat16 values, cast exactly.
    """
    root = tmp_path / "bids"
    llm2bids.record(
        root,
        model=str(tiny_dir(arch)),
        task="narrative",
        max_tokens=64,
        batch_size=1,
        device="cpu",  # the reference below is computed on the CPU
        dtype=dtype,
        verbose=0,
    )
    lm = llm2bids.load_model(str(tiny_dir(arch)), device="cpu", dtype=dtype)
    runs = tokenize_runs(builtin_set("narrative"), lm.tokenizer, max_tokens=64)
    rng = np.random.default_rng(0)
    for bold in find_runs(root)[:3]:
        run = load_run(bold)
        ents = dict(p.split("-") for p in bold.name.split("_")[:-1])
        stim = runs[int(ents["run"]) - 1]
        expected = direct_activations(lm.model, stim.token_ids)
        np.testing.assert_array_equal(
            read_events(str(bold).replace("_bold.nii", "_events.tsv"))["token_id"], stim.token_ids
        )
        volume = np.asarray(load_img(bold).dataobj)
        geom = run.geometry
        for _ in range(50):
            t, layer, neuron = (rng.integers(s) for s in expected.shape)
            x, y, z = geom.voxel_of(layer, neuron)
            assert volume[x, y, z, t] == expected[t, layer, neuron]
        np.testing.assert_array_equal(run.by_layer(), expected)


def test_batched_padding_does_not_leak(tmp_path, tiny_dir):
    """Runs recorded in padded batches match runs recorded one at a time."""
    one, many = tmp_path / "one", tmp_path / "many"
    for root, bs in ((one, 1), (many, 4)):
        llm2bids.record(
            root,
            model=str(tiny_dir("llama")),
            task="langloc",
            max_tokens=80,
            batch_size=bs,
            device="cpu",
            verbose=0,
        )
    for a, b in zip(find_runs(one), find_runs(many)):
        np.testing.assert_allclose(load_run(a).data, load_run(b).data, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt_neox", "phi", "bloom", "falcon", "gemma"])
def test_architectures_record_to_valid_datasets(tmp_path, tiny_dir, valid, arch):
    root = tmp_path / "bids"
    paths = llm2bids.record(
        root, model=str(tiny_dir(arch)), task="arithmetic", max_tokens=64, verbose=0
    )
    assert paths and all(p.exists() for p in paths)
    run = load_run(paths[0])
    assert run.data.shape[0] == len(run.events)
    assert np.abs(run.data).sum() > 0
    valid(root)


def test_dataset_contents_and_validator(recorded, valid):
    valid(recorded)
    description = json.loads((recorded / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw"
    assert "NOT BRAIN DATA" in (recorded / "README.md").read_text()
    participants = pd.read_csv(recorded / "participants.tsv", sep="\t")
    row = participants.iloc[0]
    assert row.participant_id == "sub-tinyllama" and row.architecture == "llama"
    assert row.n_layers == 3 and row.mlp_neurons_per_layer == 40
    task = json.loads((recorded / "task-langloc_bold.json").read_text())
    assert task["TaskName"] == "langloc" and task["RepetitionTime"] == 1.0
    bold = find_runs(recorded, task="langloc")[0]
    meta = llm2bids.bids.run_metadata(bold)
    for key in ("ModelID", "HookPoint", "ModelDtype", "VoxelGrid", "NeuronsPerLayer"):
        assert key in meta
    events = read_events(str(bold).replace("_bold.nii", "_events.tsv"))
    assert set(events.trial_type) == {"special", "sentence", "nonword"}
    assert events.special.iloc[0] == 1 and events.special.iloc[1:].sum() == 0
    assert (recorded / "stimuli" / "task-langloc" / "localizer1.txt").exists()


def test_pybids_indexes_runs(recorded):
    layout = BIDSLayout(recorded, validate=False)
    assert layout.get_subjects() == ["tinyllama"]
    assert set(layout.get_tasks()) == {"narrative", "langloc"}
    runs = layout.get(
        subject="tinyllama", task="langloc", suffix="bold", extension=[".nii", ".nii.gz"]
    )
    assert len(runs) == len(find_runs(recorded, task="langloc"))
    assert sorted(r.entities["run"] for r in runs) == list(range(1, len(runs) + 1))
    assert runs[0].get_metadata()["RepetitionTime"] == 1.0


def test_nilearn_masker_gives_load_run_matrix(recorded):
    bold = find_runs(recorded)[0]
    run = load_run(bold)
    masked = neuron_masker(run.geometry).transform(str(bold))
    np.testing.assert_array_equal(masked, run.data)
    dropped = load_run(bold, drop_special=True)
    assert dropped.data.shape[0] == run.data.shape[0] - 1


def test_second_model_and_task_add_to_dataset(tmp_path, tiny_dir, valid):
    root = tmp_path / "bids"
    llm2bids.record(root, model=str(tiny_dir("llama")), task="narrative", max_tokens=64, verbose=0)
    llm2bids.record(root, model=str(tiny_dir("gpt2")), task="narrative", max_tokens=64, verbose=0)
    llm2bids.record(root, model=str(tiny_dir("gpt2")), task="code", max_tokens=64, verbose=0)
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert participants.participant_id.tolist() == ["sub-tinygpt2", "sub-tinyllama"]
    assert participants.architecture.tolist() == ["gpt2", "llama"]
    assert {p.parents[1].name for p in find_runs(root)} == set(participants.participant_id)
    valid(root)


def test_resume_and_parameter_clash(tmp_path, tiny_dir):
    root = tmp_path / "bids"
    model = str(tiny_dir("llama"))
    first = llm2bids.record(root, model=model, task="narrative", max_tokens=64, verbose=0)
    stamp = {p: p.stat().st_mtime_ns for p in first}
    again = llm2bids.record(root, model=model, task="narrative", max_tokens=64, verbose=0)
    assert again == first and {p: p.stat().st_mtime_ns for p in first} == stamp
    with pytest.raises(ParameterClashError, match="max_tokens: 64 -> 48"):
        llm2bids.record(root, model=model, task="narrative", max_tokens=48, verbose=0)
    assert {p: p.stat().st_mtime_ns for p in first} == stamp  # nothing touched
    replaced = llm2bids.record(
        root, model=model, task="narrative", max_tokens=48, verbose=0, overwrite=True
    )
    assert len(replaced) > len(first)
    assert sorted(find_runs(root)) == sorted(replaced)


@pytest.mark.parametrize("compress", [False, True])
def test_resume_records_again_a_run_cut_short_by_a_crash(tmp_path, tiny_dir, compress):
    """After a crash the rename of a run can reach the disk before its data: resuming must
    not keep that run. It is recorded again, the others are left as they are."""
    root = tmp_path / "bids"
    options = dict(model=str(tiny_dir("llama")), task="narrative", max_tokens=64, verbose=0)
    first = llm2bids.record(root, compress=compress, **options)
    original = {p: p.read_bytes() for p in first}
    cut = first[1]
    cut.write_bytes(original[cut][: len(original[cut]) // 2])
    stamp = {p: p.stat().st_mtime_ns for p in first if p != cut}
    again = llm2bids.record(root, compress=compress, **options)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in first if p != cut} == stamp  # not rewritten
    assert {p: p.read_bytes() for p in first} == original  # the cut run is whole again


def test_task_name_clash_with_other_stimuli(tmp_path, tiny_dir):
    root = tmp_path / "bids"
    text = tmp_path / "a.txt"
    text.write_text("One text about cats and dogs.", encoding="utf-8")
    llm2bids.record(root, model=str(tiny_dir("llama")), task="mine", stimuli=text, verbose=0)
    text.write_text("Another text entirely.", encoding="utf-8")
    with pytest.raises(ParameterClashError, match="other stimuli"):
        llm2bids.record(root, model=str(tiny_dir("llama")), task="mine", stimuli=text, verbose=0)


def test_user_stimuli_tsv_conditions(tmp_path, tiny_dir, valid):
    tsv = tmp_path / "s.tsv"
    pd.DataFrame(
        {
            "text": ["The cat sat on the mat.", "Blick florp snarg.", "A dog ran home."],
            "condition": ["sentence", "nonword", "sentence"],
            "run": [1, 1, 2],
        }
    ).to_csv(tsv, sep="\t", index=False)
    root = tmp_path / "bids"
    paths = llm2bids.record(root, model=str(tiny_dir("llama")), task="mine", stimuli=tsv, verbose=0)
    assert len(paths) == 2
    events = load_run(paths[0]).events
    assert events.trial_type.tolist()[0] == "special"
    assert set(events.trial_type[1:]) == {"sentence", "nonword"}
    valid(root)


def test_layers_subset_and_resid_hook(tmp_path, tiny_dir, valid):
    root = tmp_path / "bids"
    paths = llm2bids.record(
        root,
        model=str(tiny_dir("llama")),
        task="arithmetic",
        layers=[1],
        max_tokens=64,
        device="cpu",  # compared with a CPU reference below
        verbose=0,
    )
    run = load_run(paths[0])
    assert run.geometry.n_layers == 1 and run.metadata["RecordedLayers"] == [1]
    lm = llm2bids.load_model(str(tiny_dir("llama")), device="cpu")
    stim = tokenize_runs(builtin_set("arithmetic"), lm.tokenizer, max_tokens=64)[0]
    np.testing.assert_array_equal(
        run.by_layer()[:, 0], direct_activations(lm.model, stim.token_ids)[:, 1]
    )
    resid = llm2bids.record(
        root,
        model=str(tiny_dir("llama")),
        task="arithmetic",
        hook_point="resid",
        max_tokens=64,
        verbose=0,
    )
    assert load_run(resid[0], hook_point="resid").geometry.n_neurons == 32
    valid(root)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gated; non-gated with Conv1D and biases
def test_mlp_out_round_trip_is_exact(tmp_path, tiny_dir, valid, arch):
    """acq-mlpout holds each layer's down-projection output (hidden size wide), exactly."""
    root = tmp_path / "bids"
    paths = llm2bids.record(
        root,
        model=str(tiny_dir(arch)),
        task="arithmetic",
        hook_point="mlp_out",
        max_tokens=48,
        batch_size=1,  # the reference runs one sequence at a time (same matrix shapes)
        device="cpu",  # compared with a CPU reference below
        verbose=0,
    )
    assert all("_acq-mlpout_" in p.name for p in paths)
    lm = llm2bids.load_model(str(tiny_dir(arch)), device="cpu")
    stims = tokenize_runs(builtin_set("arithmetic"), lm.tokenizer, max_tokens=48)
    for bold, stim in zip(paths, stims):
        run = load_run(bold)
        assert run.geometry.n_neurons == lm.model.config.hidden_size
        assert run.metadata["HookPoint"] == "mlp_out"
        expected = direct_activations(lm.model, stim.token_ids, output=True)
        np.testing.assert_array_equal(run.by_layer(), expected)
    assert (
        load_run(
            root=root,
            subject=paths[0].name.split("_")[0],
            task="arithmetic",
            run=1,
            hook_point="mlp_out",
        ).data.shape[1]
        == expected.shape[1] * expected.shape[2]
    )
    valid(root)


def test_hooks_bind_each_layer_and_are_removed():
    model = tiny_model("llama")
    spec = arch_spec(model)
    seen = {}
    with neuron_hooks(model, lambda layer, x: seen.setdefault(layer, x.detach().clone())):
        model(torch.tensor([[1, 2, 3]]))
    direct = direct_activations(model, [1, 2, 3])
    for layer in range(3):
        np.testing.assert_array_equal(seen[layer][0].numpy(), direct[:, layer])
    assert not any(spec.down_module(model, i)._forward_pre_hooks for i in range(3))
    with pytest.raises(RuntimeError), neuron_hooks(model, lambda layer, x: None):
        raise RuntimeError("boom")
    assert not any(spec.down_module(model, i)._forward_pre_hooks for i in range(3))


def test_bad_inputs_leave_dataset_unchanged(tmp_path, tiny_dir):
    root = tmp_path / "bids"
    model = str(tiny_dir("llama"))
    llm2bids.record(root, model=model, task="narrative", max_tokens=64, verbose=0)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    with pytest.raises(ModelLoadError, match="does not exist"):
        llm2bids.record(root, model=str(tmp_path / "nope"), verbose=0)
    with pytest.raises(ModelLoadError, match="does not exist"):
        llm2bids.record(root, model=str(tmp_path / "model.gguf"), verbose=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(StimuliError, match="empty"):
        llm2bids.record(root, model=model, task="x", stimuli=empty, verbose=0)
    with pytest.raises(InputError, match="needs --task"):
        llm2bids.record(root, model=model, stimuli=empty, verbose=0)
    with pytest.raises(InputError, match="subject label"):
        llm2bids.record(root, model=model, subject="__", verbose=0)
    with pytest.raises(InputError, match="built-in tasks"):
        llm2bids.record(root, model=model, task="nosuchtask", verbose=0)
    after = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    assert before == after


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, MambaConfig

    model = AutoModelForCausalLM.from_config(
        MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    with pytest.raises(UnsupportedArchitectureError, match="llama.*register_architecture"):
        wrap_model(model, tiny_tokenizer())


def test_out_of_disk_leaves_no_complete_looking_file(tmp_path, tiny_dir, monkeypatch):
    import llm2bids.bids.nifti as nifti

    root = tmp_path / "bids"
    calls = {"n": 0}
    real = nifti._write_all

    def flaky(f, data):  # the second run's data block: part of it lands, then the disk is full
        calls["n"] += 1
        if calls["n"] == 4:
            f.write(data[:100])
            raise OSError(28, "No space left on device")
        return real(f, data)

    monkeypatch.setattr(nifti, "_write_all", flaky)
    with pytest.raises(OSError, match="No space"):
        llm2bids.record(
            root,
            model=str(tiny_dir("llama")),
            task="narrative",
            max_tokens=64,
            batch_size=1,
            verbose=0,
        )
    for bold in find_runs(root):
        load_run(bold)  # every file that looks complete is complete
    assert not [p for p in root.rglob("*") if "llm2bids-tmp" in p.name]


def test_disk_estimate_refuses(tmp_path, tiny_dir, monkeypatch):
    import shutil as _shutil

    import llm2bids.recording.recorder as recorder

    monkeypatch.setattr(
        recorder.shutil,
        "disk_usage",
        lambda p: _shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000),
    )
    with pytest.raises(DiskSpaceError, match="free"):
        llm2bids.record(
            tmp_path / "bids", model=str(tiny_dir("llama")), task="narrative", verbose=0
        )
    assert find_runs(tmp_path / "bids") == []


def test_unreachable_hub_reads_only_the_local_cache(monkeypatch):
    """Offline, a hub id fails at once (no retries) and says why and what to do instead."""
    from llm2bids.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    # The message comes only from a cache-only load (local_files_only), which never retries.
    with pytest.raises(ModelLoadError, match="unreachable .* not in its local cache"):
        llm2bids.load_model("some-org/not-cached-model", device="cpu")


def test_events_spans_index_the_stimulus_files(recorded, tiny_dir):
    """Each token's stim_file and character span point at its own text in the dataset's
    stimuli/ folder; its word is the word of that text."""
    import re

    from llm2bids.bids.events import read_events

    tokenizer = llm2bids.load_model(str(tiny_dir("llama")), device="cpu").tokenizer
    checked = 0
    for bold in find_runs(recorded, subject="tinyllama"):
        events = read_events(str(bold).replace("_bold.nii", "_events.tsv"))
        (stim_file,) = set(events.stim_file)
        text = (recorded / "stimuli" / stim_file).read_text().removesuffix("\n")
        words = re.findall(r"\S+", text)
        for row in events[events.special == 0].itertuples():
            piece = text[row.char_start : row.char_stop]
            assert tokenizer.decode([row.token_id]) == piece
            if piece.strip():
                assert piece.strip() in words[row.word]
            checked += 1
        assert events[events.special == 1].word.isna().all()
    assert checked > 500
