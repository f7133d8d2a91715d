"""Comparing models at scale: matching many models' networks, and a group fit of one geometry.

    python benchmarks/run.py --only compare         # the table in RESULTS.md
    python benchmarks/compare.py matching           # one measurement, printed as JSON
    python benchmarks/compare.py groupfit

Each measurement runs in a fresh process (peak memory is the process's ``VmHWM``):

- ``matching``: 10 models with 64 networks each, word-level time courses over 50,000 words
  (50 documents of 1,000 words; AR(1) signals, 8 networks shared by all models), every one of
  the 45 pairs matched (Hungarian on ``|r|``) against 200 circular shifts within documents:
  what the group level does once the time courses are on words.
- ``groupfit``: three subjects of the SmolLM2-135M geometry (30 x 1,536 neurons), 4 runs of
  512 tokens each with planted shared networks (the at-size generator): the group CanICA over
  all their runs (20 components) and each subject's dual regression.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

N_MODELS, N_NETWORKS, N_DOCUMENTS, WORDS_PER_DOCUMENT, N_SHARED = 10, 64, 50, 1000, 8
GROUP_SUBJECTS, GROUP_RUNS, GROUP_TOKENS, GROUP_COMPONENTS = 3, 4, 512, 20


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(x.split()[1]) for x in status if x.startswith("VmHWM:")) / 1024


def _ar1(rng, n: int, phi: float = 0.7) -> np.ndarray:
    from scipy.signal import lfilter

    return lfilter([1.0], [1.0, -phi], rng.standard_normal(n))


def matching() -> dict:
    """The ``matching`` measurement of the module docstring."""
    from llm2bids.overlap import match_time_courses, model_similarity

    rng = np.random.default_rng(0)
    n_words = N_DOCUMENTS * WORDS_PER_DOCUMENT
    documents = np.repeat(np.arange(N_DOCUMENTS), WORDS_PER_DOCUMENT)
    shared = np.column_stack([_ar1(rng, n_words) for _ in range(N_SHARED)])
    models = []
    for _ in range(N_MODELS):
        own = np.column_stack([_ar1(rng, n_words) for _ in range(N_NETWORKS - N_SHARED)])
        courses = np.column_stack([shared, own])[:, rng.permutation(N_NETWORKS)]
        models.append(courses + 0.5 * rng.standard_normal(courses.shape))
    start = time.perf_counter()
    shares = []
    for a, b in itertools.combinations(models, 2):
        table = match_time_courses(a, b, documents, n_permutations=200, seed=0)
        shares.append(model_similarity(table)["matched_share"])
    seconds = time.perf_counter() - start
    return {
        "measurement": "matching",
        "what": f"{N_MODELS} models x {N_NETWORKS} networks, {n_words} words, "
        f"{len(shares)} pairs, 200 shifts",
        "seconds": seconds,
        "seconds_per_pair": seconds / len(shares),
        "peak_MB": _peak_mb(),
        "check": f"matched share {np.mean(shares):.3f} (planted {N_SHARED / N_NETWORKS:.3f})",
    }


def groupfit() -> dict:
    """The ``groupfit`` measurement of the module docstring."""
    from atsize import GEOMETRIES, planted_dataset

    from llm2bids.decomposition import FunctionalNetworks, dual_regression
    from synthetic import write_synthetic

    n_layers, n_neurons = GEOMETRIES["SmolLM2-135M"]
    work = Path(tempfile.mkdtemp(prefix="llm2bids-groupfit-"))
    subjects = {}
    for k in range(GROUP_SUBJECTS):
        runs, _, conditions = planted_dataset(n_layers, n_neurons, GROUP_RUNS, GROUP_TOKENS, k)
        subjects[f"s{k}"] = write_synthetic(work / "bids", runs, conditions, subject=f"s{k}")
    start = time.perf_counter()
    all_runs = [r for runs in subjects.values() for r in runs]
    fit = FunctionalNetworks(n_components=GROUP_COMPONENTS, random_state=0).fit(all_runs)
    fitted = time.perf_counter()
    members = [int(dual_regression(fit, runs).networks.sum()) for runs in subjects.values()]
    seconds = time.perf_counter() - start
    return {
        "measurement": "groupfit",
        "what": f"{GROUP_SUBJECTS} subjects x {GROUP_RUNS} runs x {GROUP_TOKENS} tokens, "
        f"{n_layers * n_neurons} neurons, {GROUP_COMPONENTS} components",
        "seconds": seconds,
        "group_fit_s": fitted - start,
        "dual_regression_s": seconds - (fitted - start),
        "peak_MB": _peak_mb(),
        "check": f"members per subject {members}",
    }


def bench_compare() -> list[dict]:
    """Both measurements, each in a fresh process."""
    rows = []
    for measurement in ("matching", "groupfit"):
        out = subprocess.run(
            [sys.executable, str(Path(__file__)), measurement],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("measurement", choices=["matching", "groupfit"])
    args = parser.parse_args()
    print(json.dumps({"matching": matching, "groupfit": groupfit}[args.measurement]()))
