"""Interruption, resume, concurrency, corrupt inputs, numerical faults, determinism."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

import llm2bids
from llm2bids.bids import find_runs, load_run
from llm2bids.decomposition import FunctionalNetworks
from llm2bids.exceptions import DatasetError, InputError, NumericalError
from llm2bids.models import load_model
from tiny import poisoned

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import llm2bids.recording.writer as writer
    real = writer.write_run_pieces  # how a CPU recording writes its runs
    flag = Path(sys.argv[3])
    count = {"n": 0}

    def slow(path, *a, **k):
        count["n"] += 1
        if count["n"] == 4:          # three runs are complete: signal, then hang mid-write
            from llm2bids._io import atomic_path
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"partial")
                flag.touch()
                time.sleep(float(sys.argv[4]))
        return real(path, *a, **k)

    writer.write_run_pieces = slow
    import llm2bids
    llm2bids.record(sys.argv[1], model=sys.argv[2], task="narrative", max_tokens=48,
                    batch_size=1, verbose=0)
""")


def _snapshot(root):
    return {
        p.relative_to(root): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".llm2bids.lock"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("ref") / "bids"
    llm2bids.record(
        root, model=str(tiny_dir("llama")), task="narrative", max_tokens=48, batch_size=1, verbose=0
    )
    return root


@pytest.mark.parametrize("sig,hang", [(signal.SIGKILL, 60), (signal.SIGINT, 2)])
def test_interrupted_recording_resumes_identically(tmp_path, tiny_dir, reference, valid, sig, hang):
    root, flag = tmp_path / "bids", tmp_path / "flag"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(tiny_dir("llama")), str(flag), str(hang)]
    )
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), "the child never reached the fourth run"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    done = find_runs(root)
    assert len(done) >= 3
    for bold in done:  # whatever looks complete is complete
        load_run(bold)
    valid(root)
    llm2bids.record(
        root, model=str(tiny_dir("llama")), task="narrative", max_tokens=48, batch_size=1, verbose=0
    )
    assert _snapshot(root) == _snapshot(reference)


@pytest.mark.parametrize("layout", ["assembled", "gathered"])
def test_recording_is_byte_identical(reference, tmp_path, tiny_dir, monkeypatch, layout):
    """Again, and with either write layout of CPU runs (small rows are assembled, wide rows
    gathered; the tiny model's are small, so ``gathered`` forces the other)."""
    from llm2bids.recording import writer

    if layout == "gathered":
        monkeypatch.setattr(writer, "GATHER_FROM_BYTES", 0)
    again = tmp_path / "bids"
    llm2bids.record(
        again,
        model=str(tiny_dir("llama")),
        task="narrative",
        max_tokens=48,
        batch_size=1,
        verbose=0,
    )
    assert _snapshot(again) == _snapshot(reference)


def test_two_processes_record_into_one_dataset(tmp_path, tiny_dir, valid):
    root = tmp_path / "bids"
    code = (
        "import sys, llm2bids; llm2bids.record(sys.argv[1], model=sys.argv[2], "
        "task=['narrative', 'arithmetic'], max_tokens=48, verbose=0)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(root), str(tiny_dir(a))])
        for a in ("llama", "gpt2")
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert sorted(participants.participant_id) == ["sub-tinygpt2", "sub-tinyllama"]
    assert {p.parents[1].name for p in find_runs(root)} == set(participants.participant_id)
    valid(root)


@pytest.fixture
def copy_of(reference, tmp_path):
    import shutil

    root = tmp_path / "bids"
    shutil.copytree(reference, root)
    return root


def test_truncated_and_foreign_runs_are_named(copy_of):
    bold = find_runs(copy_of)[0]
    data = bold.read_bytes()
    bold.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{bold.name}.*truncated"):
        load_run(bold)
    with pytest.raises(DatasetError, match="truncated"):
        FunctionalNetworks(n_components=2).fit(find_runs(copy_of))
    bold.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(DatasetError, match=f"{bold.name} is not a readable NIfTI"):
        load_run(bold)


def test_wrong_geometry_and_event_rows_are_named(copy_of):
    import json

    sidecar = next((copy_of / "sub-tinyllama" / "func").glob("*_acq-mlp_bold.json"))
    meta = json.loads(sidecar.read_text())
    before = _snapshot(copy_of)
    meta["NeuronsPerLayer"], meta["VoxelGrid"] = 50, [8, 7, 3]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="spatial shape"):
        load_run(find_runs(copy_of)[0])
    sidecar.write_bytes(before[sidecar.relative_to(copy_of)])
    events = find_runs(copy_of)[0].with_name(
        find_runs(copy_of)[0].name.replace("_bold.nii", "_events.tsv")
    )
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join(lines[:-2]))
    with pytest.raises(DatasetError, match="rows but its run has"):
        load_run(find_runs(copy_of)[0])


def test_hand_edited_participants_is_refused_and_untouched(copy_of, tiny_dir):
    path = copy_of / "participants.tsv"
    path.write_text("subject\tmodel\ntinyllama\tx\n")
    before = _snapshot(copy_of)
    with pytest.raises(DatasetError, match="participants.tsv has no participant_id column"):
        llm2bids.record(
            copy_of, model=str(tiny_dir("gpt2")), task="narrative", max_tokens=48, verbose=0
        )
    assert _snapshot(copy_of) == before


@pytest.mark.parametrize("layout", ["assembled", "gathered"])
def test_nan_activation_names_layer_and_token(tmp_path, tiny_dir, monkeypatch, layout):
    from llm2bids.recording import writer

    if layout == "gathered":  # the writes of wide layers, straight from the activations
        monkeypatch.setattr(writer, "GATHER_FROM_BYTES", 0)
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    with (
        poisoned(lm, 1, float("nan")),
        pytest.raises(NumericalError, match="layer 1, token 3"),
    ):
        llm2bids.record(
            tmp_path / "bids",
            model=lm,
            task="narrative",
            max_tokens=48,
            batch_size=1,
            verbose=0,
        )
    assert find_runs(tmp_path / "bids") == []
    assert not list((tmp_path / "bids").rglob("*_events.tsv"))  # nothing of the run is left


def test_constant_neurons_are_handled(tmp_path):
    from synthetic import planted_networks, write_synthetic

    runs, truth = planted_networks()
    for r in runs:
        r[:, 0, :10] = 1.5  # ten dead (constant) neurons in layer 0
    fit = FunctionalNetworks(n_components=4).fit(write_synthetic(tmp_path / "b", runs))
    assert np.isfinite(fit.components_).all()
    dead = np.isin(fit.geometry_.masker_order, np.arange(10))
    assert not fit.networks_[:, dead].any()


def test_ica_non_convergence_is_reported_not_dropped(tmp_path, caplog):
    """Gaussian noise gives FastICA nothing to converge on: it must say so, and keep going;
    Picard-O (the default) converges on the same data."""
    from synthetic import write_synthetic

    rng = np.random.default_rng(0)
    noise = [rng.standard_normal((200, 4, 100)).astype(np.float32) for _ in range(2)]
    runs = write_synthetic(tmp_path / "noise", noise, special_first=False)
    with caplog.at_level("WARNING", logger="llm2bids.decomposition"):
        fit = FunctionalNetworks(n_components=10, ica_solver="fastica").fit(runs)
    assert fit.convergence_warnings_ > 0
    assert any("did not converge in" in r.getMessage() for r in caplog.records)
    assert fit.components_.shape[0] == 10  # results kept
    assert FunctionalNetworks(n_components=10).fit(runs).convergence_warnings_ == 0
    with pytest.raises(InputError, match="ica_solver"):
        FunctionalNetworks(ica_solver="infomax").fit(runs)
    with pytest.raises(InputError, match="ica_max_iter"):
        FunctionalNetworks(ica_max_iter=0).fit(runs)


HOSTILE = [
    "tab\there",
    "quote \" and ' marks",
    "back\\slash \\n literal",
    "n/a",
    "",
    "emoji 🙂 and ñ",
    "line\nbreak",
    "crlf\r\nend",
    "# hash",
    "\u2028sep",
]


def test_hostile_text_records_to_a_valid_dataset(tmp_path, tiny_dir, valid):
    import csv

    tsv = tmp_path / "hostile.tsv"
    pd.DataFrame(
        {"text": [t if t.strip() else "x" for t in HOSTILE], "condition": ["weird"] * len(HOSTILE)}
    ).to_csv(tsv, sep="\t", index=False, quoting=csv.QUOTE_ALL)
    root = tmp_path / "bids"
    paths = llm2bids.record(
        root, model=str(tiny_dir("llama")), task="hostile", stimuli=tsv, verbose=0
    )
    valid(root)
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    for bold in paths:
        events = load_run(bold).events
        assert events.token.tolist() == [lm.tokenizer.decode([int(t)]) for t in events.token_id]


def test_cleanup_spares_temporaries_of_live_writers(tmp_path):
    """A concurrent job's in-progress file must survive another job's start-up cleanup."""
    from llm2bids import _io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f"{_io.TMP_MARK}{os.getpid()}-abcd1234-x_bold.nii"
    stale = tmp_path / f"{_io.TMP_MARK}{dead.pid}-abcd1234-y_bold.nii"
    live.write_bytes(b"writing")
    stale.write_bytes(b"left by a killed run")
    assert _io.remove_stale_temporaries(tmp_path) == 1
    assert live.exists() and not stale.exists()


def test_cpu_pipeline_holds_at_most_one_batch_while_the_next_is_computed(tmp_path):
    """Memory bound: when a CPU batch is handed over, every earlier batch is written (freed)."""
    import threading
    import time

    import torch

    from llm2bids.bids.geometry import VoxelGeometry
    from llm2bids.recording.capture import CapturedBatch
    from llm2bids.recording.pipeline import MemoryPlan, RecordingPipeline
    from llm2bids.stimuli.runs import RunStimulus
    from tiny import tiny_tokenizer

    runs = [
        RunStimulus(i + 1, "d", np.arange(5, dtype=np.int64), ["x"] * 5, np.zeros(5, bool))
        for i in range(20)
    ]
    batches = [runs[i : i + 4] for i in range(0, 20, 4)]
    geometry = VoxelGeometry(2, 3)
    plan = MemoryPlan.of(geometry, torch.device("cpu"), False, batches, n_writers=3)
    pipeline = RecordingPipeline(plan, [0, 1], tiny_tokenizer())
    written, lock = [], threading.Lock()

    def slow_task(layers, run, paths):
        def write():
            time.sleep(0.02)
            with lock:
                written.append(run.index)

        return write

    pipeline.run_writer.layers_task = slow_task
    pipeline.add_tokens(runs)
    paths = {r.index: (tmp_path / f"{r.index}_bold.nii", tmp_path / f"{r.index}.tsv") for r in runs}
    layers = [torch.zeros(4, 5, 3), torch.zeros(4, 5, 3)]
    for k, batch in enumerate(batches):
        pipeline.write(CapturedBatch(layers=layers), batch, range(4), paths)
        assert sorted(written) == [r.index for b in batches[: k - 0] for r in b][: 4 * k]
    pipeline.close()
    assert sorted(written) == list(range(1, 21))
    assert all(p[1].exists() for p in paths.values())  # events written before each bold task


def test_writer_error_reaches_the_caller():
    import threading

    from llm2bids.recording.writer import WriterPool

    gate = threading.Event()

    def fail():
        gate.wait()
        raise OSError("disk gone")

    released = []
    writer = WriterPool(n_threads=2)
    futures = [writer.submit(fail, then=lambda: released.append(1)) for _ in range(3)]
    gate.set()
    with pytest.raises(OSError, match="disk gone"):
        writer.wait(futures)
    with pytest.raises(OSError, match="disk gone"):  # a new failure is raised again
        writer.wait([writer.submit(fail, then=lambda: released.append(1))])
    writer.submit(fail)
    with pytest.raises(OSError, match="disk gone"):
        writer.close()  # and at close, which does not hang
    assert released == [1, 1, 1, 1]  # every task's callback ran, failed, skipped or not


def test_batch_plan_is_fixed_by_the_runs_and_tapers_at_the_end_on_the_cpu():
    from llm2bids.recording.recorder import _plan_batches
    from llm2bids.stimuli.runs import RunStimulus

    runs = [
        RunStimulus(
            i + 1, "d", np.zeros(10 + i, dtype=np.int64), ["x"] * (10 + i), np.zeros(10 + i, bool)
        )
        for i in range(12)
    ]
    plan = _plan_batches(runs, 4)
    assert [len(b) for b in plan] == [4, 4, 2, 1, 1]
    assert [r.index for b in plan for r in b] == list(range(12, 0, -1))  # longest first
    assert [len(b) for b in _plan_batches(runs[:1], 4)] == [1]
    assert [len(b) for b in _plan_batches(runs[:4], 4)] == [4]  # one batch: same peak as many
    assert [len(b) for b in _plan_batches(runs[:6], 4)] == [4, 1, 1]
    assert [[r.index for r in b] for b in _plan_batches(runs[::-1], 4)] == [
        [r.index for r in b] for b in plan
    ]
    # staged on an accelerator the forward is the fast side: no taper
    assert [len(b) for b in _plan_batches(runs, 4, staged=True)] == [4, 4, 4]
    assert [len(b) for b in _plan_batches(runs[:6], 4, staged=True)] == [4, 2]


def test_an_output_folder_inside_the_raw_dataset_is_refused(tmp_path, tiny_dir, valid):
    """Only derivatives/ may hold analysis outputs inside a raw dataset (else it is invalid)."""
    from llm2bids.cli.main import main

    root = tmp_path / "bids"
    llm2bids.record(root, model=str(tiny_dir("llama")), task="langloc", max_tokens=48, verbose=0)
    before = _snapshot(root)
    args = ["localize", str(root), str(root / "out"), "participant", "--task", "langloc"]
    assert main(args) == 2
    assert _snapshot(root) == before
    valid(root)
    inside = root / "derivatives" / "llm2bids"
    assert main(["localize", str(root), str(inside), "participant", "--task", "langloc"]) == 0
    valid(root)


def test_a_removed_run_is_noticed_before_analysis(tmp_path, tiny_dir):
    from llm2bids.exceptions import DatasetError

    root = tmp_path / "bids"
    paths = llm2bids.record(
        root, model=str(tiny_dir("llama")), task="langloc", max_tokens=48, verbose=0
    )
    paths[1].unlink()
    with pytest.raises(DatasetError, match=r"of \d+ runs are in the dataset \(missing run 02\)"):
        llm2bids.run_networks(root, tmp_path / "out", n_components=2, verbose=0)
    assert not (tmp_path / "out").exists()


def test_prune_never_writes_into_a_folder_of_other_files(tmp_path, tiny_dir):
    from llm2bids.exceptions import InputError

    keep = tmp_path / "keep.tsv"
    keep.write_text("layer\tneuron\n0\t1\n1\t2\n2\t3\n", encoding="utf-8")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"precious": true}')
    with pytest.raises(InputError, match="not a pruned model"):
        llm2bids.run_prune(str(tiny_dir("llama")), keep, folder)
    assert (folder / "config.json").read_text() == '{"precious": true}'
    pruned = tmp_path / "pruned"
    llm2bids.run_prune(str(tiny_dir("llama")), keep, pruned)
    with pytest.raises(InputError, match="--overwrite"):
        llm2bids.run_prune(str(tiny_dir("llama")), keep, pruned)
    llm2bids.run_prune(str(tiny_dir("llama")), keep, pruned, overwrite=True)


def test_report_of_an_unknown_subject_is_an_error(tmp_path, tiny_dir):
    from llm2bids.cli.main import main

    root = tmp_path / "bids"
    llm2bids.record(root, model=str(tiny_dir("llama")), task="langloc", max_tokens=48, verbose=0)
    out = root / "derivatives" / "llm2bids"
    llm2bids.run_localize(root, out, task="langloc", top_percent=5)
    assert main(["report", str(out), "--participant-label", "nobody"]) == 2
    assert not (out / "sub-nobody.html").exists()


def test_bad_cli_inputs_are_errors_not_tracebacks(tmp_path, tiny_dir, capsys):
    from llm2bids.cli.main import main

    root, model = tmp_path / "bids", str(tiny_dir("llama"))
    llm2bids.record(root, model=model, task="langloc", max_tokens=48, verbose=0)
    out = str(root / "derivatives" / "llm2bids")
    bad = tmp_path / "bad.tsv"
    bad.write_text("layer\tneuron\n0\t1\n0\tx\n", encoding="utf-8")
    good = tmp_path / "good.tsv"
    good.write_text("layer\tneuron\n0\t1\n", encoding="utf-8")
    cases = [
        (
            ["lesion", str(root), out, "participant", "--networks", str(bad), "--model", model],
            "data row 2 holds 'x'",
        ),
        (
            [
                "localize",
                str(root),
                out,
                "participant",
                "--task",
                "langloc",
                "--contrast",
                "sentence -",
            ],
            "not a valid expression",
        ),
        (
            [
                "lesion",
                str(root),
                out,
                "participant",
                "--networks",
                str(good),
                "--model",
                model,
                "--eval-text",
                str(tmp_path / "missing.txt"),
            ],
            "cannot be read",
        ),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_interrupted_networks_keep_old_derivatives_and_resume(recorded, tmp_path, monkeypatch):
    """Ctrl-C in `networks` publishes nothing; the rerun fits only what was left, identically."""
    from llm2bids.derivatives import STAGING_DIR

    options = dict(n_components=3, n_permutations=10, per_run=True, verbose=0)
    out, fresh = tmp_path / "deriv", tmp_path / "fresh"
    llm2bids.run_networks(recorded, out, seed=0, **options)
    before = _snapshot(out)
    real_fit, fits = FunctionalNetworks.fit, []

    def counted(self, runs, y=None):
        fits.append(len(runs))
        if interrupt_at == len(fits):
            raise KeyboardInterrupt
        return real_fit(self, runs, y)

    monkeypatch.setattr(FunctionalNetworks, "fit", counted)
    interrupt_at = 3  # two task fits done, the all-task fit interrupted
    with pytest.raises(KeyboardInterrupt):
        llm2bids.run_networks(recorded, out, seed=1, **options)
    # The earlier derivatives are intact: nothing of the interrupted run is published.
    assert {k: v for k, v in _snapshot(out).items() if STAGING_DIR not in str(k)} == before
    interrupt_at, fits[:] = None, []
    llm2bids.run_networks(recorded, out, seed=1, **options)
    resumed = len(fits)
    fits[:] = []
    llm2bids.run_networks(recorded, fresh, seed=1, **options)
    assert resumed == len(fits) - 2  # the two finished task fits were not redone
    assert not (out / STAGING_DIR).exists()
    assert _snapshot(out) == _snapshot(fresh)
