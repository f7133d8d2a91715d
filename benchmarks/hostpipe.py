"""The host side of recording alone: ``record()`` on ready per-layer tensors, no model.

A stand-in model (:class:`common.ReadyActivations`) hands ready tensors of a real geometry
(16 layers x 8192 neurons: Llama-3.2-1B) to ``record``'s hooks as fast as it takes them, so a
``record()`` call, timed from entry to return with everything it does (tokenizing, planning,
buffer setup, sidecars, events, capture, writer threads), shows what limits recording when the
forward pass is fast, as it is on a GPU. Against it, plain writes of the same bytes into the
same number of files with as many threads as ``record`` has writers, alternated with it in the
same run (rotating order, medians), each after a ``sync``; and the same plain writes with each
thread checking its file's values finite first, as ``record``'s writers must (an exact check
reads every byte once more: the best a checked recording can do on the CPU path). Rows:

- a one-batch recording and one of 64 runs;
- each on the CPU path (what ``record`` does on the CPU) and on the staged path (the
  accelerator's path: stage, ring of run buffers, per-run copies) run on the CPU, which adds
  two copies that a GPU does on the device and over the bus;
- the first ``record()`` of each case apart from the later ones (after a plain write of the
  same bytes that brings the page cache to its steady state: on this VM the first gigabytes
  written into a fresh page cache take up to three times longer, whoever writes them);
- buffer setup alone, its own row: the pipeline's memory allocated (and, staged, the ring
  faulted in), as ``record`` does it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
from common import buffer_setup, plain_write, ready_model, recorded_sizes, texts

CASES = {"one batch": 4, "64 runs": 64}  # runs (batch 4)


def _record(lm, stim, folder: Path, run_tokens: int, batch_size: int) -> float:
    from llm2bids import record

    os.sync()  # start from a clean page cache, as the plain write does
    start = time.perf_counter()
    record(
        folder, model=lm, stimuli=stim, max_tokens=run_tokens + 8, batch_size=batch_size, verbose=0
    )
    return time.perf_counter() - start


def _bold_sizes(lm, stim, run_tokens, shape) -> list[int]:
    """The sizes of the bold files ``record`` writes for ``stim``."""
    from llm2bids.bids.geometry import VoxelGeometry
    from llm2bids.bids.nifti import run_file_bytes
    from llm2bids.stimuli import tokenize_runs

    geometry = VoxelGeometry(*shape)
    return [
        run_file_bytes(geometry, len(r)) for r in tokenize_runs(stim, lm.tokenizer, run_tokens + 8)
    ]


def _alternated(work, lm, stim, sizes, threads, run_tokens, batch_size, rounds) -> dict:
    """First ``record()`` apart, then ``rounds`` rounds of record, plain write and checked plain
    write, in rotating order."""
    folder = work / "pipe"

    def rec():
        t = _record(lm, stim, folder, run_tokens, batch_size)
        assert sorted(recorded_sizes(folder)) == sorted(sizes)  # the same bytes
        shutil.rmtree(folder)
        return t

    def plain():
        return plain_write(work / "plain", sizes, threads)

    def checked():
        return plain_write(work / "plain", sizes, threads, check=True)

    plain()  # the page cache in its steady state
    times = {"first": [rec()], "record": [], "plain": [], "checked": []}
    order = [("record", rec), ("plain", plain), ("checked", checked)]
    for k in range(rounds):  # each side first as often as the others
        for name, fn in order[k % 3 :] + order[: k % 3]:
            times[name].append(fn())
    return times


def bench_pipeline(work: Path, shape=(16, 8192), run_tokens=256, batch_size=4, repeats=3):
    """The rows described in the module docstring."""
    import llm2bids.recording.recorder as recorder
    from llm2bids.recording.writer import default_writers

    lm = ready_model(*shape, batch_size, run_tokens + 8)
    threads = default_writers()
    rows = []
    for staged in (False, True):
        path = "staged (on the CPU)" if staged else "CPU"
        stages_on = recorder.stages_on
        recorder.stages_on = (lambda device: True) if staged else stages_on
        try:
            for case, n_runs in CASES.items():
                stim = texts(n_runs * run_tokens, run_tokens, lm.tokenizer)
                sizes = _bold_sizes(lm, stim, run_tokens, shape)
                rounds = repeats * (2 if n_runs <= 8 else 1)
                times = _alternated(work, lm, stim, sizes, threads, run_tokens, batch_size, rounds)
                gb = sum(sizes) / 1e9
                t_rec, t_plain = np.median(times["record"]), np.median(times["plain"])
                t_checked = np.median(times["checked"])
                setup, nbytes = buffer_setup(lm, stim, run_tokens + 8, batch_size, staged)
                rows.append(
                    {
                        "path": path,
                        "case": case,
                        "runs": len(sizes),
                        "writers": threads,
                        "GB": gb,
                        "record_GB_s": gb / t_rec,
                        "plain_write_GB_s": gb / t_plain,
                        "record_vs_plain": float(t_plain / t_rec),
                        "checked_plain_write_GB_s": gb / t_checked,
                        "record_vs_checked_plain": float(t_checked / t_rec),
                        "first_record_s": times["first"][0],
                        "later_record_s": float(t_rec),
                        "later_vs_first": float(t_rec / times["first"][0]),
                    }
                )
                rows.append(
                    {
                        "path": path,
                        "case": f"{case}: buffer setup",
                        "setup_s": setup,
                        "setup_MB": nbytes / 1e6,
                    }
                )
                print(rows[-2], rows[-1], flush=True)
        finally:
            recorder.stages_on = stages_on
    return rows
