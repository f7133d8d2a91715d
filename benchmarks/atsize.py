"""Analysis at research scale: synthetic datasets of real model geometries.

    python benchmarks/run.py --only atsize          # the table in RESULTS.md
    python benchmarks/atsize.py Llama-3-8B --runs 16 --tokens 512   # one geometry, printed

Each geometry gets a dataset written through llm2bids' own BIDS writer: ``runs`` runs of
``tokens`` tokens, Gaussian noise on every neuron plus planted networks (each 0.4% of the
neurons, following sparse independent time courses) and one localizer network that responds
to condition ``a`` of an a/b block design. Then each analysis stage runs in a fresh process
(peak memory is the process's ``VmHWM``): ``networks`` with CanICA and with DictLearning
(20 components, n_jobs=1: the group fit, its time courses, the seed refit and every table:
components, atlas, key neurons, connectivity, recurrence; the optional single-run fits are
left out), ``localize`` (contrast ``a - b``, nilearn's GLM) and the HTML ``report``. Dice says whether the planted networks are still found at that size: each planted
network is matched one to one (Hungarian) to a found network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

#: (layers, MLP neurons per layer) of the models whose recordings the benchmark imitates.
GEOMETRIES = {
    "SmolLM2-135M": (30, 1536),
    "Llama-3.2-1B": (16, 8192),
    "Llama-3-8B": (32, 14336),
}
N_PLANTED = 10  # ICA networks; the localizer network comes on top
NETWORK_FRACTION = 0.004  # of all neurons, per planted network
BLOCK = 16  # tokens per condition block of the a/b design
N_COMPONENTS = 20
#: Runs x tokens per dataset: 8,192 tokens (15 GB at the 8B geometry), and a quick size.
SIZE, QUICK_SIZE = (16, 512), (8, 256)
STAGES = ("write", "networks-canica", "networks-dictlearning", "localize", "report")


def planted_dataset(n_layers, n_neurons, n_runs, n_tokens, seed=0):
    """Runs (a generator, one run in memory at a time), the true networks and the conditions.

    Returns
    -------
    runs : iterator of ndarray of float32, shape (n_tokens, n_layers, n_neurons)
    truth : ndarray of int, shape (N_PLANTED + 1, size)
        Flat ``layer * n_neurons + neuron`` indices of each network; the last row is the
        localizer network.
    conditions : list of list of str
        ``a`` / ``b`` per token of each run, in blocks of ``BLOCK`` tokens.
    """
    rng = np.random.default_rng(seed)
    n_total = n_layers * n_neurons
    size = max(10, round(NETWORK_FRACTION * n_total))
    truth = rng.permutation(n_total)[: (N_PLANTED + 1) * size].reshape(N_PLANTED + 1, size)
    weights = rng.uniform(0.8, 1.2, size=truth.shape).astype(np.float32)
    conditions = []
    for _ in range(n_runs):
        first = rng.integers(2)
        blocks = (np.arange(n_tokens) // BLOCK + first) % 2
        conditions.append(np.where(blocks == 0, "a", "b").tolist())

    def runs():
        for conds in conditions:
            data = rng.standard_normal((n_tokens, n_total), dtype=np.float32)
            sources = rng.laplace(size=(n_tokens, N_PLANTED)) * (
                rng.random((n_tokens, N_PLANTED)) < 0.3
            )
            sources = np.column_stack([3 * sources, 1.5 * (np.array(conds) == "a")])
            for k, idx in enumerate(truth):
                data[:, idx] += sources[:, k, None].astype(np.float32) * weights[k]
            data[0] = 100.0  # a BOS-like outlier volume, marked special
            yield data.reshape(n_tokens, n_layers, n_neurons)

    return runs(), truth, conditions


def matched_dice(truth: np.ndarray, found: list[np.ndarray]) -> np.ndarray:
    """Dice of each true network with the found network it is matched to (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    dice = np.zeros((len(truth), max(1, len(found))))
    for i, t in enumerate(truth):
        for j, f in enumerate(found):
            dice[i, j] = 2 * np.intersect1d(t, f).size / (t.size + f.size)
    rows, cols = linear_sum_assignment(-dice)
    return dice[rows, cols]


def _flat(table, n_neurons) -> np.ndarray:
    return (table.layer.to_numpy() * n_neurons + table.neuron.to_numpy()).astype(np.int64)


def run_stage(stage: str, work: Path, geometry: str, n_runs: int, n_tokens: int) -> dict:
    """One stage in this process; returns its row (seconds, and Dice where it applies)."""
    import pandas as pd

    import llm2bids

    n_layers, n_neurons = GEOMETRIES[geometry]
    bids, deriv = work / "bids", work / "derivatives"
    start = time.perf_counter()
    row: dict = {}
    if stage == "write":
        from synthetic import write_synthetic

        runs, truth, conditions = planted_dataset(n_layers, n_neurons, n_runs, n_tokens)
        paths = write_synthetic(bids, runs, conditions)
        np.save(work / "truth.npy", truth)
        row["GB"] = sum(p.stat().st_size for p in paths) / 1e9
    elif stage.startswith("networks-"):
        method = stage.split("-", 1)[1]
        files = llm2bids.run_networks(
            bids,
            deriv,
            method=method,
            n_components=N_COMPONENTS,
            per_run=False,
            verbose=0,
        )
        ((result,),) = [files.values()]  # one subject
        (keys,) = [p for p in result.files["keyneurons"] if "task-" in p.name]
        table = pd.read_csv(keys, sep="\t")
        found = [_flat(g, n_neurons) for _, g in table.groupby("component")]
        dice = matched_dice(np.load(work / "truth.npy")[:N_PLANTED], found)
        row |= {"dice_mean": float(dice.mean()), "dice_min": float(dice.min())}
    elif stage == "localize":
        truth = np.load(work / "truth.npy")[-1]
        (result,) = llm2bids.run_localize(
            bids,
            deriv,
            task="synth",
            contrast="a - b",
            top_percent=100 * truth.size / (n_layers * n_neurons),
        ).values()
        found = _flat(pd.read_csv(result.files["keyneurons"], sep="\t"), n_neurons)
        dice = matched_dice(truth[None], [found])
        row |= {"dice_mean": float(dice.mean()), "dice_min": float(dice.min())}
    elif stage == "report":
        llm2bids.build_report(deriv, "synth")
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    row["seconds"] = time.perf_counter() - start
    peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return row | {"peak_MB": peak / 1024}


def bench_atsize(geometries, n_runs: int, n_tokens: int, work: Path | None = None) -> list[dict]:
    """Every stage on every geometry, each stage in a fresh process; one row per stage."""
    rows = []
    for geometry in geometries:
        folder = Path(tempfile.mkdtemp(prefix="llm2bids-atsize-", dir=work))
        n_layers, n_neurons = GEOMETRIES[geometry]
        try:
            for stage in STAGES:
                out = subprocess.run(
                    [sys.executable, __file__, geometry, "--runs", str(n_runs)]
                    + ["--tokens", str(n_tokens), "--stage", stage, "--work", str(folder)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    raise RuntimeError(f"{geometry} {stage} failed:\n{out.stderr[-4000:]}")
                row = {
                    "geometry": geometry,
                    "neurons": n_layers * n_neurons,
                    "runs x tokens": f"{n_runs} x {n_tokens}",
                    "stage": stage,
                } | json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(row, flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("geometry", nargs="+", choices=list(GEOMETRIES))
    parser.add_argument("--runs", type=int, default=SIZE[0])
    parser.add_argument("--tokens", type=int, default=SIZE[1])
    parser.add_argument("--stage", choices=STAGES, help="run one stage in WORK (internal)")
    parser.add_argument("--work", type=Path, help="where the dataset is written (a temp folder)")
    args = parser.parse_args()
    if args.stage:
        import logging
        import warnings

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        row = run_stage(args.stage, args.work, args.geometry[0], args.runs, args.tokens)
        print(json.dumps(row))
    else:
        bench_atsize(args.geometry, args.runs, args.tokens, args.work)


if __name__ == "__main__":
    main()
