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
from .models import load_model
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
    """Remember which stages finished with which parameters."""

    def __init__(self, out: Path, overwrite: bool):
        self.path = out / "stages.json"
        self.done = {} if overwrite or not self.path.exists() else json.loads(self.path.read_text())

    def fresh(self, name: str, params: dict) -> bool:
        return self.done.get(name) == json.loads(json.dumps(params, default=str))

    def finish(self, name: str, params: dict) -> None:
        self.done[name] = json.loads(json.dumps(params, default=str))
        _io.write_json(self.path, self.done)


@fill_doc
def run_demo(
    out_dir: str | Path,
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
    bids, deriv = out / "bids", out / "bids" / "derivatives" / "llm2bids"
    cfg = QUICK if quick else FULL
    stages = _Stages(out, overwrite)
    t0 = time.time()
    say = print if verbose else (lambda *a, **k: None)

    lm = load_model(model, device="cpu")
    sub = lm.label
    p = {"model": lm.spec, "max_tokens": cfg["max_tokens"]}
    say(f"[1/8] record {lm.model_id} on every built-in task -> {bids}")
    record(
        bids,
        model=lm,
        max_tokens=cfg["max_tokens"],
        batch_size=4,
        overwrite=overwrite,
        verbose=verbose,
    )  # resumes (skips) finished runs by itself
    stages.finish("record", p)

    say("[2/8] validate the raw dataset (bids-validator-deno)")
    raw_valid = validate(bids)
    if not raw_valid.valid:
        raise Llm2BidsError("the raw dataset does not validate:\n" + raw_valid.summary())

    p = p | {k: cfg[k] for k in ("n_components", "threshold", "n_permutations")}
    if not stages.fresh("networks", p):
        say(
            f"[3/8] networks: CanICA ({cfg['n_components']} components) per task and over all tasks, recurrence"
        )
        run_networks(
            bids,
            deriv,
            participant_label=[sub],
            n_components=cfg["n_components"],
            threshold=cfg["threshold"],
            n_permutations=cfg["n_permutations"],
            verbose=verbose,
        )
        stages.finish("networks", p)
    else:
        say("[3/8] networks: reused")

    if not stages.fresh("localize", p):
        say("[4/8] language localizer: sentence - nonword, top 1% of units")
        run_localize(
            bids,
            deriv,
            task="langloc",
            contrast="sentence - nonword",
            participant_label=[sub],
            top_percent=1.0,
        )
        stages.finish("localize", p)
    else:
        say("[4/8] localizer: reused")

    networks = BIDSPath(subject=sub, acquisition="mlp", description="canica", root=deriv)
    localizer = networks.update(task="langloc", description="sentenceMinusNonword")
    tables = {
        "networks": networks.update(suffix="keyneurons", extension=".tsv"),
        "localizer": localizer.update(suffix="keyneurons", extension=".tsv"),
    }
    p = p | {"n_controls": cfg["n_controls"]}
    summaries, lesions = {}, {}
    for name, table in tables.items():
        lesions[name] = table.update(
            description=f"{table.description}Ablate", suffix="lesion", extension=".tsv"
        ).fpath
        if not stages.fresh(f"lesion-{name}", p):
            say(f"[5/8] lesion the {name} units versus {cfg['n_controls']} random controls")
            results = run_lesion(
                bids,
                deriv,
                table.fpath,
                participant_label=[sub],
                n_controls=cfg["n_controls"],
                model=lm,
                verbose=verbose,
            )
            summaries[name] = results[sub].summary
            stages.finish(f"lesion-{name}", p)
        else:
            say(f"[5/8] lesion {name}: reused")
            summaries[name] = json.loads(lesions[name].with_suffix(".json").read_text())["Summary"]

    components = networks.update(suffix="components", extension=".nii.gz")
    ranking = rank_neurons(components.fpath, run_geometry(find_runs(bids, subject=sub)[0]))
    p = p | {"keep_fractions": cfg["keep_fractions"], "keep_controls": cfg["keep_controls"]}
    keep_path = networks.update(suffix="keeponly", extension=".tsv").fpath
    if not stages.fresh("keep-only", p):
        say(f"[6/8] keep only the top key neurons at {cfg['keep_fractions']} versus random sets")
        curve = keep_only_curve(
            lm, ranking, cfg["keep_fractions"], cfg["keep_controls"], verbose=verbose
        )
        write_table(
            keep_path,
            curve,
            provenance(
                fractions=cfg["keep_fractions"],
                n_controls=cfg["keep_controls"],
                ranking="max |z| over the all-task components",
            ),
        )
        stages.finish("keep-only", p)
    else:
        say("[6/8] keep-only: reused")

    p = p | {"prune_fraction": cfg["prune_fraction"]}
    prune_path = networks.update(suffix="pruning", extension=".tsv").fpath
    if not stages.fresh("prune", p):
        say(f"[7/8] prune to the top {cfg['prune_fraction']:.0%} key neurons, save, reload")
        write_table(
            prune_path,
            _prune_and_reload(lm, ranking, cfg["prune_fraction"], deriv, sub),
            provenance(fraction=cfg["prune_fraction"])
            | {
                "folder": {
                    "Description": "The pruned model's folder, relative to the derivatives root."
                }
            },
        )
        stages.finish("prune", p)
    else:
        say("[7/8] prune: reused")

    say("[8/8] report")
    init_derivatives(deriv, bids)  # refresh dataset-level files (.bidsignore) of a reused run
    report = build_report(deriv, sub)
    deriv_valid = validate(deriv)
    if not deriv_valid.valid:
        raise Llm2BidsError("the derivatives do not validate:\n" + deriv_valid.summary())
    say(
        _summary_text(
            {name: pd.read_csv(path, sep="\t") for name, path in lesions.items()},
            pd.read_csv(keep_path, sep="\t"),
            pd.read_csv(prune_path, sep="\t"),
        )
    )
    say(
        f"done in {time.time() - t0:.0f} s. Raw dataset: {bids} (valid); derivatives: {deriv} "
        f"(valid); report: {report}"
    )
    return {"bids": bids, "derivatives": deriv, "report": report, "summaries": summaries}


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
