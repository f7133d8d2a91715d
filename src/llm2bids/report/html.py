"""``sub-<label>.html``: one self-contained report per model, built from derivatives alone."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from .._io import write_text
from .._version import __version__
from ..bids.dataset import NOT_BRAIN_DATA
from . import figures as fig

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
figure{margin:1em 0}figcaption{font-size:.9em;color:#444}img{max-width:100%}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}
.warn{background:#fff3cd;padding:.6em;border-left:4px solid #e0a800}pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}"""


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure(path: Path, caption: str, root: Path) -> str:
    rel = path.relative_to(root)
    return (
        f'<figure><img src="{_img(path)}" alt="{html.escape(str(rel))}">'
        f"<figcaption>{html.escape(caption)} {fig.VOXEL_NOTE} "
        f"(<code>{html.escape(str(rel))}</code>)</figcaption></figure>"
    )


def _table(frame: pd.DataFrame, n: int = 12) -> str:
    return frame.head(n).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)


def _sidecar(path: Path) -> dict:
    side = path.with_name(path.name.split(".")[0] + ".json")
    return json.loads(side.read_text()) if side.exists() else {}


def build_report(derivatives: str | Path, subject: str) -> Path:
    """Draw every figure and write ``sub-<subject>.html`` from the derivatives folder."""
    root = Path(derivatives)
    func = root / f"sub-{subject}" / "func"
    figdir = root / "figures" / f"sub-{subject}"
    sections: list[str] = []
    params_seen: dict = {}

    comps = sorted(func.glob("*_desc-canica_components.nii.gz")) + sorted(
        func.glob("*_desc-dictlearning_components.nii.gz")
    )
    overall = [c for c in comps if "_task-" not in c.name] or comps[:1]
    if overall:
        c = overall[0]
        params_seen["networks"] = _sidecar(c).get("Parameters", {})
        n_comp = fig.load_volume(c).shape[3]
        parts = ["<h2>Functional networks</h2>"]
        for k in range(min(n_comp, 4)):
            path = fig.layer_mosaic(
                fig.load_volume(c, k),
                figdir / f"component-{k + 1:02d}.png",
                f"component {k + 1} (z)",
            )
            parts.append(
                _figure(
                    path,
                    f"Component {k + 1} of the group decomposition over all "
                    "tasks, z-scored and drawn as a layer mosaic (one panel per layer).",
                    root,
                )
            )
        counts = c.with_name(c.name.replace("_components.nii.gz", "_layercounts.tsv"))
        if counts.exists():
            table = pd.read_csv(counts, sep="\t")
            parts.append(
                _figure(
                    fig.layer_counts_plot(
                        table, figdir / "key-neurons-per-layer.png", "key neurons per layer"
                    ),
                    "Key neurons (|z| >= threshold in some network) per layer.",
                    root,
                )
            )
        keys = c.with_name(c.name.replace("_components.nii.gz", "_keyneurons.tsv"))
        if keys.exists():
            parts.append(
                "<p>Key-neuron table (first rows):</p>" + _table(pd.read_csv(keys, sep="\t"))
            )
        conn = c.with_name(c.name.replace("_components.nii.gz", "_connectivity.tsv"))
        if conn.exists():
            matrix = pd.read_csv(conn, sep="\t").set_index("component")
            parts.append(
                _figure(
                    fig.heatmap(
                        matrix, figdir / "connectivity.png", "network connectivity (correlation)"
                    ),
                    "Correlation between the networks' time courses (nilearn "
                    "ConnectivityMeasure), averaged over runs.",
                    root,
                )
            )
        sections.append("\n".join(parts))

    for rec in sorted(func.glob("*_recurrence.tsv")):
        table = pd.read_csv(rec, sep="\t")
        parts = ["<h2>Recurrence across tasks and runs</h2>"]
        tasks = table[table.scope == "task"]
        if not tasks.empty:
            names = sorted(set(tasks.reference) | set(tasks.other))
            matrix = pd.DataFrame(1.0, index=names, columns=names)
            for (a, b), g in tasks.groupby(["reference", "other"]):
                matrix.loc[a, b] = matrix.loc[b, a] = g.dice.mean()
            parts.append(
                _figure(
                    fig.heatmap(
                        matrix,
                        figdir / "recurrence-tasks.png",
                        "mean matched Dice between tasks",
                        0,
                        1,
                        "viridis",
                    ),
                    "Mean Dice of one-to-one matched networks (Hungarian on |spatial "
                    "correlation|) between the tasks' group decompositions.",
                    root,
                )
            )
        runs = table[table.scope == "run"]
        if not runs.empty:
            summary = runs.groupby("reference").agg(
                runs=("other", "nunique"),
                mean_dice=("dice", "mean"),
                null_p95=("null_dice_p95", "mean"),
                recurring_fraction=("recurs", "mean"),
            )
            parts.append(
                "<p>Per task: single-run networks matched to the task's group networks; "
                "<em>recurring_fraction</em> = matched pairs beating the permutation null "
                "(p &lt; 0.05).</p>" + _table(summary.reset_index())
            )
        for freq in sorted(func.glob("*_desc-*Recurrence_map.nii.gz"))[:2]:
            parts.append(
                _figure(
                    fig.layer_mosaic(
                        fig.load_volume(freq),
                        figdir / (freq.name.split(".")[0] + ".png"),
                        "recurrence frequency",
                        cmap="viridis",
                        symmetric=False,
                    ),
                    f"Fraction of single-run decompositions in which each neuron belongs to a network ({freq.name}).",
                    root,
                )
            )
        sections.append("\n".join(parts))

    zmaps = sorted(func.glob("*_stat-z_statmap.nii.gz"))
    if zmaps:
        parts = ["<h2>Localizer (GLM)</h2>"]
        for z in zmaps:
            params_seen["localizer"] = _sidecar(z).get("Parameters", {})
            parts.append(
                _figure(
                    fig.layer_mosaic(
                        fig.load_volume(z),
                        figdir / (z.name.split(".")[0] + ".png"),
                        "contrast z-map",
                    ),
                    f"z-map of the contrast {params_seen['localizer'].get('contrast', '')} "
                    "(nilearn FirstLevelModel, no HRF, no drift, no smoothing).",
                    root,
                )
            )
        for counts in sorted(func.glob("*_layercounts.tsv")):
            if "Minus" in counts.name:
                table = pd.read_csv(counts, sep="\t")
                parts.append(
                    _figure(
                        fig.layer_counts_plot(
                            table,
                            figdir / "localizer-units-per-layer.png",
                            "localizer units per layer",
                        ),
                        "Units selected by the localizer contrast, per layer.",
                        root,
                    )
                )
        sections.append("\n".join(parts))

    lesions = sorted(func.glob("*_lesion.tsv"))
    if lesions:
        parts = ["<h2>Lesions versus random controls</h2>"]
        for les in lesions:
            table = pd.read_csv(les, sep="\t")
            side = _sidecar(les)
            parts.append(
                _figure(
                    fig.lesion_plot(
                        table,
                        figdir / (les.name.split(".")[0] + ".png"),
                        les.name.split("_desc-")[-1].replace("_lesion.tsv", ""),
                    ),
                    f"Effect of masking the target set ({side.get('Parameters', {}).get('mode')}) next to "
                    "size-matched random neuron sets; dashed: intact model.",
                    root,
                )
            )
            parts.append(_table(table, 20))
        sections.append("\n".join(parts))

    keeps = sorted(func.glob("*_keeponly.tsv"))
    for keep in keeps:
        table = pd.read_csv(keep, sep="\t")
        sections.append(
            "<h2>Keep only the key neurons</h2>"
            + _figure(
                fig.keep_only_plot(table, figdir / "keep-only.png", "keep-only curves"),
                "Metrics when only the top key neurons (by |z|) are kept, versus random sets of the "
                "same size.",
                root,
            )
            + _table(table, 30)
        )

    prunes = sorted(func.glob("*_pruning.tsv"))
    for pr in prunes:
        sections.append("<h2>Pruned model</h2>" + _table(pd.read_csv(pr, sep="\t")))

    methods = _methods(params_seen)
    body = (
        f"<h1>llm2bids report: sub-{html.escape(subject)}</h1>"
        f'<p class="warn">{html.escape(NOT_BRAIN_DATA)}</p>'
        + "\n".join(sections)
        + f"<h2>Methods</h2><pre>{html.escape(methods)}</pre>"
    )
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>llm2bids sub-{html.escape(subject)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    out = root / f"sub-{subject}.html"
    write_text(out, page)
    return out


def _methods(params: dict) -> str:
    import nilearn
    import torch
    import transformers

    net = params.get("networks", {})
    loc = params.get("localizer", {})
    return (
        f"Activations of the MLP neurons (the input of each layer's down projection) of "
        f"{net.get('model_id', 'the model')} were recorded with llm2bids {__version__} "
        f"(transformers {transformers.__version__}, torch {torch.__version__}) and stored as a "
        "BIDS dataset in which each neuron is a voxel and each token a volume (RepetitionTime "
        "1 s by convention). Special tokens (BOS) were recorded and left out of all analyses.\n\n"
        f"Functional networks were estimated with nilearn {nilearn.__version__} "
        f"{str(net.get('method', 'canica')).upper()} (n_components = {net.get('n_components')}, "
        f"random_state = {net.get('random_state')}, explicit neuron mask, no smoothing, "
        "per-run z-scoring, special tokens regressed out with spike regressors). Component maps "
        f"were z-scored over neurons and sign-corrected; a neuron belongs to a network where "
        f"|z| >= {net.get('threshold')}. Networks were matched across tasks and runs one to one "
        "(Hungarian assignment on |spatial correlation|) and compared with Dice and Jaccard "
        "against a permutation null.\n\n"
        + (
            f"A localizer contrast ({loc.get('contrast')}) was fitted with nilearn's "
            "FirstLevelModel (no HRF convolution, no drift model, OLS, no smoothing); units were "
            f"selected as {loc.get('selection')}.\n\n"
            if loc
            else ""
        )
        + "Causal tests zeroed the selected neurons at inference and compared perplexity on "
        "held-out text (sliding windows of 256 tokens, stride 128), accuracy on templated "
        "minimal pairs, and greedy next-token accuracy with random neuron sets matched in size "
        "per layer."
    )
