"""The benchmark's references measure the same work as ``record`` (run on the CPU here)."""

import sys
from pathlib import Path

import numpy as np
import torch

import llm2bids
from llm2bids.bids import find_runs
from llm2bids.stimuli import tokenize_runs

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu  # noqa: E402
from run import _texts  # noqa: E402


def test_reference_pipeline_writes_the_bytes_record_writes(tmp_path):
    lm = gpu.build("tiny", torch.device("cpu"), torch.float32)
    stim = _texts(512, 64, lm.tokenizer)
    runs = tokenize_runs(stim, lm.tokenizer, max_tokens=72)
    gpu.reference_pipeline(lm, runs, 4, tmp_path / "reference", writers=2)
    llm2bids.record(tmp_path / "bids", model=lm, stimuli=stim, max_tokens=72, batch_size=4)
    recorded = find_runs(tmp_path / "bids")
    assert len(recorded) == len(runs) == 8
    for bold in recorded:
        index = int(bold.name.split("_run-")[1][:2])
        reference = tmp_path / "reference" / f"run-{index}_bold.nii"
        assert reference.read_bytes() == bold.read_bytes()


def test_gpu_section_dry_run_reports_every_row():
    result = gpu.bench_gpu(quick=True, dry_run=True)
    (row,) = result["rows"]
    assert row["shape"] == "tiny" and row["tokens"] > 400
    speeds = [v for k, v in row.items() if k.endswith(("_tok_s", "_GB_s"))]
    assert len(speeds) == 9 and all(np.isfinite(v) and v > 0 for v in speeds)
    assert row["peak_host_MB"] >= row["host_after_load_MB"] > 0
