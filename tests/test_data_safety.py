"""Nothing written is ever contradicted: refused commands change no file, OS faults are one
clear line, and an analysis never applies one model's neurons to another model."""

import shutil

import pandas as pd
import pytest

import llm2bids
from faults import disk_fills_after, read_only
from llm2bids.cli.main import main
from llm2bids.exceptions import DatasetError, ModelLoadError, ParameterClashError
from test_reliability import _snapshot
from tiny import save_tiny

TOKENS = 48


def _record(root, model, **kwargs):
    kwargs.setdefault("task", "narrative")
    return llm2bids.record(root, model=str(model), max_tokens=TOKENS, verbose=0, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one tiny llama (same name and shape, other weights), and a gpt2."""
    base = tmp_path_factory.mktemp("checkpoints")
    return {
        "a": save_tiny("llama", base / "a" / "tiny-llama", seed=0),
        "b": save_tiny("llama", base / "b" / "tiny-llama", seed=1),
        "gpt2": save_tiny("gpt2", base / "tiny-gpt2"),
    }


@pytest.fixture(scope="module")
def one_subject(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("one") / "bids"
    _record(root, checkpoints["a"], subject="tiny")
    return root


@pytest.fixture
def dataset(one_subject, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(one_subject, root)
    return root


@pytest.mark.parametrize(
    "model,kwargs",
    [
        ("gpt2", {}),  # another model, same task: refused by the recording's parameters
        ("gpt2", {"task": "langloc"}),  # another model, another task: by the subject's row
        ("b", {"task": "langloc"}),  # another checkpoint of the model, without a session
        ("gpt2", {"task": "langloc", "overwrite": True}),  # the subject keeps the narrative
        ("gpt2", {"subject": "t-i-n-y", "task": "langloc"}),  # a label that reduces to "tiny"
    ],
)
def test_recording_another_model_into_a_subject_changes_no_file(
    dataset, checkpoints, model, kwargs
):
    before = _snapshot(dataset)
    kwargs.setdefault("subject", "tiny")
    with pytest.raises(ParameterClashError, match="Nothing was written") as err:
        _record(dataset, checkpoints[model], **kwargs)
    assert "sub-tiny" in str(err.value) and "--session" in str(err.value)
    assert _snapshot(dataset) == before  # participants.tsv byte for byte included


def test_overwrite_replaces_a_subject_only_when_nothing_of_the_old_model_is_left(
    dataset, checkpoints, valid
):
    _record(dataset, checkpoints["gpt2"], subject="tiny", overwrite=True)
    row = llm2bids.bids.dataset.read_participants(dataset).set_index("participant_id")
    assert row.loc["sub-tiny", "architecture"] == "gpt2"
    valid(dataset)


def test_checkpoints_of_one_model_are_sessions_of_one_subject(tmp_path, checkpoints, valid):
    root = tmp_path / "bids"
    _record(root, checkpoints["a"], subject="tiny", session="a")
    participants = (root / "participants.tsv").read_bytes()
    _record(root, checkpoints["b"], subject="tiny", session="b")
    assert (root / "participants.tsv").read_bytes() == participants
    sessions = pd.read_csv(root / "sub-tiny" / "sub-tiny_sessions.tsv", sep="\t")
    assert sessions.session_id.tolist() == ["ses-a", "ses-b"]
    assert sessions.model_spec.tolist() == [str(checkpoints["a"]), str(checkpoints["b"])]
    valid(root)
    before = _snapshot(root)
    with pytest.raises(ParameterClashError, match="sub-tiny ses-a"):  # another revision
        _record(root, checkpoints["b"], subject="tiny", session="a", task="langloc")
    with pytest.raises(ParameterClashError, match="architecture"):  # another model
        _record(root, checkpoints["gpt2"], subject="tiny", session="c")
    assert _snapshot(root) == before


def _neuron_set(tmp_path):
    path = tmp_path / "set.tsv"
    path.write_text("layer\tneuron\n0\t1\n1\t3\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("other,differs", [("b", "ModelFingerprint"), ("gpt2", "Architecture")])
def test_an_analysis_refuses_a_model_other_than_the_recorded_one(
    dataset, checkpoints, tmp_path, other, differs
):
    out = tmp_path / "derivatives"
    with pytest.raises(DatasetError, match=differs) as err:
        llm2bids.run_lesion(
            dataset,
            out,
            _neuron_set(tmp_path),
            participant_label=["tiny"],
            model=str(checkpoints[other]),
            n_controls=2,
            verbose=0,
        )
    assert "tiny-llama" in str(err.value)  # both models named
    assert not list(out.rglob("*_lesion.tsv"))


def test_an_analysis_accepts_the_recorded_model(dataset, checkpoints, tmp_path, capsys):
    """--controls 1 has no spread: said so, not printed as nan."""
    out = tmp_path / "derivatives"
    args = ["lesion", str(dataset), str(out), "participant", "--networks"]
    args += [str(_neuron_set(tmp_path)), "--participant-label", "tiny", "--controls", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no spread from one control" in printed and "nan" not in printed
    assert list(out.rglob("*_lesion.tsv"))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_folder_passed_as_a_neuron_set_is_one_line(dataset, tmp_path, capsys):
    out = tmp_path / "derivatives"
    args = ["lesion", str(dataset), str(out), "participant", "--networks", str(tmp_path)]
    assert main(args) == 2
    _one_line_error(capsys, "is a folder", "_keyneurons.tsv")
    assert not out.exists()


def test_a_model_folder_without_tokenizer_says_so(tmp_path, checkpoints):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["a"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer.*tokenizer.json"):
        llm2bids.load_model(str(folder))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, one_subject):
    root = tmp_path_factory.mktemp("analysed") / "bids"
    shutil.copytree(one_subject, root)
    _record(
        root,
        llm2bids.bids.dataset.read_participants(root).model_spec[0],
        task="langloc",
        subject="tiny",
    )
    out = root.parent / "derivatives"
    llm2bids.run_networks(root, out, n_components=2, verbose=0)  # raises if it fails
    return root, out


@pytest.mark.parametrize("command", ["record", "networks", "localize", "report"])
def test_a_read_only_folder_is_one_line(
    analysed, tmp_path, checkpoints, monkeypatch, capsys, command
):
    root, derivatives = analysed
    out = tmp_path / "out"
    shutil.copytree(derivatives, out)
    args = {
        "record": [
            "record",
            str(root),
            "--model",
            str(checkpoints["a"]),
            "--task",
            "code",
            "--subject",
            "tiny",
            "--max-tokens",
            str(TOKENS),
        ],
        "networks": ["networks", str(root), str(out), "participant", "--n-components", "3"],
        "localize": ["localize", str(root), str(out), "participant", "--task", "langloc"],
        "report": ["report", str(out)],
    }[command]
    target = root if command == "record" else out
    before = _snapshot(root), _snapshot(out)
    read_only(monkeypatch, target)
    assert main(["--quiet", *args]) == 2
    _one_line_error(capsys, "Read-only file system", str(target), "writable folder")
    monkeypatch.undo()
    assert (_snapshot(root), _snapshot(out)) == before


def test_a_disk_that_fills_during_recording_keeps_finished_runs_and_resumes(
    tmp_path, checkpoints, monkeypatch, capsys
):
    reference = tmp_path / "reference"
    _record(reference, checkpoints["a"], batch_size=1)
    root = tmp_path / "bids"
    disk_fills_after(monkeypatch, 3)
    args = ["record", str(root), "--model", str(checkpoints["a"]), "--task", "narrative"]
    args = ["--quiet", *args, "--max-tokens", str(TOKENS), "--batch-size", "1"]
    assert main(args) == 2
    err = _one_line_error(
        capsys, "disk filled while writing", "_bold.nii", "kept and complete", "MB more", "resumes"
    )
    assert ".llm2bids-tmp-" not in err  # the file's own name, not its temporary
    monkeypatch.undo()
    finished = sorted(root.rglob("*_bold.nii"))
    assert len(finished) == 3
    expected = _snapshot(reference)
    for bold in finished:  # complete and exact
        assert bold.read_bytes() == expected[bold.relative_to(root)]
    assert not list(root.rglob(".llm2bids-tmp-*"))
    assert main(args) == 0
    assert _snapshot(root) == expected


def test_the_fingerprint_samples_any_tensor_size_and_sees_one_changed_sample():
    import torch

    from llm2bids.models.identity import FINGERPRINT_SAMPLES, weights_fingerprint

    big = torch.nn.Embedding(2**24 + 3, 1)  # float positions would round past its end
    before = weights_fingerprint(big)
    with torch.no_grad():
        big.weight[-1] += 1  # the last element is always sampled
    assert weights_fingerprint(big) != before
    small = torch.nn.Linear(3, 1, bias=False)
    assert small.weight.numel() < FINGERPRINT_SAMPLES and len(weights_fingerprint(small)) == 64
