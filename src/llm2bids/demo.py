"""``llm2bids demo``: the whole study on one model, from recording to report.

record the built-in tasks -> validate -> networks (CanICA) and recurrence -> language
localizer -> lesions of networks and localizer units versus random controls -> keep-only
curves -> prune and reload -> report. Finished stages are reused on a rerun (their
parameters are stamped in ``<out>/stages.json``) unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import _io
from ._docs import fill_doc
from .bids import find_runs, validate
from .bids.path import BIDSPath, pruned_dir
from .bids.reader import run_geometry
from .decomposition import run_networks
from .derivatives import init_derivatives, provenance, write_table
from .evaluation import (
    accuracy_text,
    keep_only_curve,
    load_pruned,
    mask_neurons,
    rank_neurons,
    run_lesion,
    run_prune,
    top_neurons,
)
from .evaluation.lesion import controls_text, summarize
from .exceptions import Llm2BidsError
from .glm import run_localize
from .models import LoadedModel, load_model
from .models.hooks import layer_count, neurons_per_layer
from .recording import record
from .report import build_report

logger = logging.getLogger("llm2bids.demo")

FULL = {
    "max_tokens": 256,
    "n_components": 10,
    "threshold": 3.0,
    "n_permutations": 50,
    "n_controls": 5,
    "keep_fractions": [0.1, 0.25, 0.5],
    "keep_controls": 3,
    "prune_fraction": 0.5,
}
QUICK = {
    "max_tokens": 96,
    "n_components": 4,
    # a tiny model has ~100 neurons: at |z| >= 3 (0.3% of a Gaussian bulk) a map often
    # selects none, and whether it does depends on the BLAS and solver versions
    "threshold": 2.0,
    "n_permutations": 10,
    "n_controls": 2,
    "keep_fractions": [0.25, 0.5],
    "keep_controls": 1,
    "prune_fraction": 0.5,
}


class _Stages:
    """Which stages finished, with which parameters, and the files each returned.

    ``<out>/stages.json`` maps a stage's name to its parameters and files (relative to the
    demo's folder); a stage is reused when its parameters are unchanged and its files exist.
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.path = out / "stages.json"
        self.done = {} if overwrite or not self.path.exists() else _io.read_json(self.path)

    def reused(self, name: str, params: dict) -> dict[str, Path] | None:
        """The files of stage ``name`` if it finished with ``params`` (None otherwise)."""
        done = self.done.get(name)
        if not isinstance(done, dict) or done.get("params") != _plain(params):
            return None
        files = {role: self.out / rel for role, rel in done.get("files", {}).items()}
        return files if all(f.exists() for f in files.values()) else None

    def finish(self, name: str, params: dict, files: dict[str, Path]) -> dict[str, Path]:
        """Record that stage ``name`` finished with ``params``, writing ``files``."""
        self.done[name] = {
            "params": _plain(params),
            "files": {role: Path(f).relative_to(self.out).as_posix() for role, f in files.items()},
        }
        _io.write_json(self.path, self.done)
        return files


def _plain(params: dict) -> dict:
    """``params`` as JSON gives it back (lists, strings), for comparison with a stored copy."""
    return json.loads(json.dumps(params, default=str))


@dataclass
class _Demo:
    """What every step of one demo shares."""

    bids: Path
    deriv: Path
    cfg: dict
    stages: _Stages
    lm: LoadedModel
    overwrite: bool
    verbose: int
    params: dict = field(default_factory=dict)  # grows step by step: a step's and all before

    @property
    def sub(self) -> str:
        return self.lm.label

    def say(self, text: str) -> None:
        if self.verbose:
            print(text)

    def step(self, name: str, title: str, added: dict, work) -> dict[str, Path]:
        """Run step ``name`` (``work()`` returns its files) unless it finished with the same
        parameters (its own and those of every step before) and its files exist."""
        self.params = self.params | added
        files = self.stages.reused(name, self.params)
        if files is not None:
            self.say(f"{title.partition(':')[0]}: reused")
            return files
        self.say(title)
        return self.stages.finish(name, self.params, work())


@fill_doc
def run_demo(
    out_dir: str | Path,
    *,
    model: str | None = None,
    quick: bool = False,
    overwrite: bool = False,
    verbose: int = 1,
) -> dict:
    """Run the whole study; return the paths and the numbers it printed.

    Parameters
    ----------
    out_dir : str or Path
        Where the dataset, its derivatives and the report go.
    model : str or None, default=None
        A model spec; ``None`` is the embedded SmolLM2-135M.
    quick : bool, default=False
        Small settings (minutes on a CPU; for tests).
    overwrite : bool, default=False
        Redo every stage instead of reusing finished ones.
    %(verbose)s
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    demo = _Demo(
        bids=out / "bids",
        deriv=out / "bids" / "derivatives" / "llm2bids",
        cfg=QUICK if quick else FULL,
        stages=_Stages(out, overwrite),
        lm=load_model(model, device="cpu"),
        overwrite=overwrite,
        verbose=verbose,
    )
    _record_step(demo)
    networks = _networks_step(demo)
    localizer = _localize_step(demo)
    lesions, summaries = _lesion_steps(demo, networks["keyneurons"], localizer["keyneurons"])
    ranking = rank_neurons(
        networks["components"], run_geometry(find_runs(demo.bids, subject=demo.sub)[0])
    )
    keep = _keep_only_step(demo, ranking, networks["keyneurons"])
    pruning = _prune_step(demo, ranking, networks["keyneurons"])
    report = _report_step(demo)
    demo.say(
        _summary_text(
            {name: pd.read_csv(path, sep="\t") for name, path in lesions.items()},
            pd.read_csv(keep, sep="\t"),
            pd.read_csv(pruning, sep="\t"),
        )
    )
    demo.say(
        f"done in {time.time() - t0:.0f} s. Raw dataset: {demo.bids} (valid); derivatives: "
        f"{demo.deriv} (valid); report: {report}"
    )
    return {"bids": demo.bids, "derivatives": demo.deriv, "report": report, "summaries": summaries}


def _record_step(demo: _Demo) -> None:
    """Record every built-in task (finished runs are resumed by ``record`` itself), validate."""
    demo.params = {"model": demo.lm.spec, "max_tokens": demo.cfg["max_tokens"]}
    demo.say(f"[1/8] record {demo.lm.model_id} on every built-in task -> {demo.bids}")
    record(
        demo.bids,
        model=demo.lm,
        max_tokens=demo.cfg["max_tokens"],
        batch_size=4,
        overwrite=demo.overwrite,
        verbose=demo.verbose,
    )
    demo.say("[2/8] validate the raw dataset (bids-validator-deno)")
    raw_valid = validate(demo.bids)
    if not raw_valid.valid:
        raise Llm2BidsError("the raw dataset does not validate:\n" + raw_valid.summary())


def _networks_step(demo: _Demo) -> dict[str, Path]:
    """CanICA per task and over all tasks, recurrence; the all-task fit's files."""
    cfg = demo.cfg

    def work():
        written = run_networks(
            demo.bids,
            demo.deriv,
            participant_label=[demo.sub],
            n_components=cfg["n_components"],
            threshold=cfg["threshold"],
            n_permutations=cfg["n_permutations"],
            verbose=demo.verbose,
        )
        result = written[demo.sub]
        return {role: result.over_all_tasks(role) for role in ("keyneurons", "components")}

    return demo.step(
        "networks",
        f"[3/8] networks: CanICA ({cfg['n_components']} components) per task and over all "
        "tasks, recurrence",
        {k: cfg[k] for k in ("n_components", "threshold", "n_permutations")},
        work,
    )


def _localize_step(demo: _Demo) -> dict[str, Path]:
    """The language localizer (sentences - nonwords, top 1% of units)."""

    def work():
        results = run_localize(
            demo.bids,
            demo.deriv,
            task="langloc",
            contrast="sentence - nonword",
            participant_label=[demo.sub],
            top_percent=1.0,
        )
        return {"keyneurons": results[demo.sub].files["keyneurons"]}

    return demo.step(
        "localize", "[4/8] language localizer: sentence - nonword, top 1% of units", {}, work
    )


def _lesion_steps(demo: _Demo, networks: Path, localizer: Path):
    """Lesion each neuron set versus random controls: the tables and their summaries."""
    lesions, summaries = {}, {}
    for name, table in {"networks": networks, "localizer": localizer}.items():

        def work(table=table):
            results = run_lesion(
                demo.bids,
                demo.deriv,
                table,
                participant_label=[demo.sub],
                n_controls=demo.cfg["n_controls"],
                model=demo.lm,
                verbose=demo.verbose,
            )
            return {"lesion": results[demo.sub].files["lesion"]}

        files = demo.step(
            f"lesion-{name}",
            f"[5/8] lesion {name}: the {name} units versus {demo.cfg['n_controls']} random "
            "controls",
            {"n_controls": demo.cfg["n_controls"]},
            work,
        )
        lesions[name] = files["lesion"]
        summaries[name] = _io.read_json(files["lesion"].with_suffix(".json"))["Summary"]
    return lesions, summaries


def _keep_only_step(demo: _Demo, ranking: pd.DataFrame, networks: Path) -> Path:
    """Keep only the top key neurons at each fraction versus random sets: the table."""
    cfg = demo.cfg
    path = BIDSPath.from_path(networks, root=demo.deriv).update(suffix="keeponly").fpath

    def work():
        curve = keep_only_curve(
            demo.lm, ranking, cfg["keep_fractions"], cfg["keep_controls"], verbose=demo.verbose
        )
        side = provenance(
            fractions=cfg["keep_fractions"],
            n_controls=cfg["keep_controls"],
            ranking="max |z| over the all-task components",
        )
        return {"keeponly": write_table(path, curve, side)}

    title = f"[6/8] keep-only: the top key neurons at {cfg['keep_fractions']} versus random sets"
    added = {"keep_fractions": cfg["keep_fractions"], "keep_controls": cfg["keep_controls"]}
    return demo.step("keep-only", title, added, work)["keeponly"]


def _prune_step(demo: _Demo, ranking: pd.DataFrame, networks: Path) -> Path:
    """Prune to the top key neurons, save, reload and compare: the table."""
    fraction = demo.cfg["prune_fraction"]
    path = BIDSPath.from_path(networks, root=demo.deriv).update(suffix="pruning").fpath

    def work():
        table = _prune_and_reload(demo.lm, ranking, fraction, demo.deriv, demo.sub)
        side = provenance(fraction=fraction) | {
            "folder": {
                "Description": "The pruned model's folder, relative to the derivatives root."
            }
        }
        return {"pruning": write_table(path, table, side)}

    title = f"[7/8] prune: to the top {fraction:.0%} key neurons, save, reload"
    return demo.step("prune", title, {"prune_fraction": fraction}, work)["pruning"]


def _report_step(demo: _Demo) -> Path:
    """The report, then the derivatives validated."""
    demo.say("[8/8] report")
    init_derivatives(demo.deriv, demo.bids)  # refresh dataset-level files of a reused run
    report = build_report(demo.deriv, demo.sub)
    deriv_valid = validate(demo.deriv)
    if not deriv_valid.valid:
        raise Llm2BidsError("the derivatives do not validate:\n" + deriv_valid.summary())
    return report


def _prune_and_reload(lm, ranking: pd.DataFrame, fraction: float, deriv: Path, sub: str):
    """Prune to the top ``fraction`` of neurons, reload, and compare with the masked model.

    Returns the pruning table's row as a DataFrame; its ``folder`` is relative to the
    derivatives root ``deriv``, so that the table does not depend on where the demo ran.
    """
    folder = pruned_dir(deriv, sub)
    n_layers, n_neurons = layer_count(lm.model), neurons_per_layer(lm.model)[0]
    keep = top_neurons(ranking, fraction, n_layers, n_neurons)
    result = run_prune(lm, keep, folder, overwrite=True)  # the demo's own folder
    reloaded = load_pruned(folder).model
    ids = lm.tokenizer(
        "The children built a small wooden raft and floated it down the river." * 8,
        return_tensors="pt",
    ).input_ids
    with torch.inference_mode():
        with mask_neurons(lm.model, keep, mode="keep"):
            masked = lm.model(ids).logits
        diff = float((reloaded(ids).logits - masked).abs().max())
        timings = {}
        for name, m in (("dense", lm.model), ("pruned", reloaded)):
            m(ids)
            start = time.perf_counter()
            for _ in range(5):
                m(ids)
            timings[name] = (time.perf_counter() - start) / 5 * 1000
    return pd.DataFrame(
        [
            {
                "kept_fraction": fraction,
                "kept_neurons": result["kept_neurons"],
                "parameters_dense": result["parameters_dense"],
                "parameters_pruned": sum(x.numel() for x in reloaded.parameters()),
                "max_abs_logit_diff_vs_keep_mask": diff,
                "latency_dense_ms": round(timings["dense"], 2),
                "latency_pruned_ms": round(timings["pruned"], 2),
                "folder": folder.relative_to(deriv).as_posix(),
            }
        ]
    )


def _summary_text(lesions: dict, keep: pd.DataFrame, pruning: pd.DataFrame) -> str:
    lines = [
        "",
        "Lesion results (target vs mean of random size-matched controls; accuracies with "
        "their 95% intervals):",
    ]
    for name, table in lesions.items():
        summary = summarize(table)
        ppl, acc = summary["perplexity"], summary["minimal_pair_accuracy"]
        rows = table.set_index("condition")
        lines.append(
            f"  {name:9s}: perplexity {ppl['baseline']:.2f} -> {ppl['target']:.2f} "
            f"({controls_text(ppl, '.2f')}); minimal pairs "
            f"{accuracy_text(rows.loc['baseline'])} -> {accuracy_text(rows.loc['target'])} "
            f"(controls {acc['control_mean']:.3f})"
        )
    lines.append("Keep only the top key neurons (target vs random mean):")
    for fraction, g in keep[keep.condition != "baseline"].groupby("fraction"):
        t, c = g[g.condition == "target"], g[g.condition == "control"]
        lines.append(
            f"  {fraction:.0%}: perplexity {t.perplexity.iloc[0]:.1f} vs "
            f"{c.perplexity.mean():.1f}; minimal pairs {accuracy_text(t.iloc[0])} "
            f"vs {c.minimal_pair_accuracy.mean():.3f}"
        )
    row = pruning.iloc[0]
    lines.append(
        f"Pruned to {row.kept_fraction:.0%} of MLP neurons: {row.parameters_dense} -> "
        f"{row.parameters_pruned} parameters, latency {row.latency_dense_ms} -> "
        f"{row.latency_pruned_ms} ms, max |logit diff| vs masked model "
        f"{row.max_abs_logit_diff_vs_keep_mask:.2e}"
    )
    return "\n".join(lines)
