"""``sub-<label>.html``: one self-contained report per model, built from derivatives alone."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .._io import write_text
from .._version import __version__
from ..bids.dataset import NOT_BRAIN_DATA
from ..bids.events import read_events
from ..bids.path import BIDSPath, figures_dir, participant_id, report_path, subjects
from ..decomposition import METHODS
from ..decomposition.networks import membership_rule
from ..exceptions import DatasetError
from ..models.hooks import HOOK_POINT_DESCRIPTIONS, hook_point_of
from . import figures as fig
from .dashboards import context_html, driving_tokens, layer_span, source_dataset, summary_items

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
figure{margin:1em 0}figcaption{font-size:.9em;color:#444}img{max-width:100%}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}
.warn{background:#fff3cd;padding:.6em;border-left:4px solid #e0a800}pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}
.scroll{overflow-x:auto;max-width:100%}.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.card h2,.card h3{margin-top:.3em}.summary{background:#f4f8fb}.summary dt{font-weight:600;float:left;clear:left;width:11em}.summary dd{margin-left:12em}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:.85em}mark{background:#ffd54f}"""


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure(path: Path, caption: str, root: Path, voxels: bool = False) -> str:
    """A figure with its caption; ``voxels``: it draws neurons as voxels (say how)."""
    rel = path.relative_to(root)
    note = f" {fig.VOXEL_NOTE}" if voxels else ""
    return (
        f'<figure><img src="{_img(path)}" alt="{html.escape(str(rel))}">'
        f"<figcaption>{html.escape(caption)}{note} "
        f"(<code>{html.escape(str(rel))}</code>)</figcaption></figure>"
    )


def _table(frame: pd.DataFrame, n: int = 12) -> str:
    """The first ``n`` rows, in a box that scrolls rather than run past the margin."""
    shown = frame.head(n).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    more = f"<p><em>First {n} of {len(frame)} rows.</em></p>" if len(frame) > n else ""
    return f'<div class="scroll">{shown}</div>{more}'


def _sidecar(file: BIDSPath) -> dict:
    side = file.sidecar().fpath
    return json.loads(side.read_text()) if side.exists() else {}


@dataclass(frozen=True)
class Section:
    """One kind of report section: the files that make it (an entity query) and its renderer.

    ``render(files, context)`` returns the HTML of zero or more sections.
    """

    query: dict
    render: Callable[[list[BIDSPath], _Context], list[str]]


@dataclass
class _Context:
    root: Path
    figures: Path
    params: dict = field(default_factory=dict)  # sidecar Parameters, by kind, for Methods
    tables: dict = field(default_factory=dict, repr=False)  # (path, reader) -> table

    def figure(self, path: Path, caption: str, voxels: bool = False) -> str:
        return _figure(path, caption, self.root, voxels)

    def table(self, path: Path, read: Callable[[Path], pd.DataFrame] | None = None) -> pd.DataFrame:
        """The TSV at ``path``, read once per report (by ``read``, default pandas' TSV reader):
        the summary card, the networks section and the dashboards show the same tables, and
        every network's dashboard the same events (callers must not modify it)."""
        key = (path, read)
        if key not in self.tables:
            self.tables[key] = read(path) if read else pd.read_csv(path, sep="\t")
        return self.tables[key]


def _overall(files: list[BIDSPath]) -> BIDSPath | None:
    """The decomposition a report shows: over all tasks, else the first task's."""
    comps = sorted(
        (c for c in files if c.description in METHODS),
        key=lambda c: (METHODS.index(c.description), c.fpath),
    )
    overall = [c for c in comps if c.task is None] or comps[:1]
    return overall[0] if overall else None


def _rule(params: dict) -> str:
    """The membership rule of the networks' parameters (``|z| >= 3``)."""
    return membership_rule(params.get("sided", "two"), float(params.get("threshold", 3.0)))


#: Component maps drawn as mosaics (every network has a dashboard).
N_MOSAICS = 4


def _networks(files: list[BIDSPath], ctx: _Context) -> list[str]:
    c = _overall(files)
    if c is None:
        return []
    ctx.params["networks"] = _sidecar(c).get("Parameters", {})
    ctx.params["hook_point"] = hook_point_of(c.acquisition)
    rule = _rule(ctx.params["networks"])
    maps = fig.load_volume(c.fpath)  # read once: each read decompresses every component
    # Membership has one owner, the atlas the networks stage wrote (never re-thresholded).
    members = fig.load_volume(
        c.update(description=None, atlas=c.description, suffix="probseg").fpath
    )
    n_maps = maps.shape[3]
    parts = ["<h2>Functional networks</h2>"]
    for k in range(min(n_maps, N_MOSAICS)):
        network = np.where(members[..., k] > 0, maps[..., k], 0)
        path = fig.layer_mosaic(
            network,
            ctx.figures / f"component-{k + 1:02d}.png",
            f"network {k + 1} (z, {rule})",
        )
        parts.append(
            ctx.figure(
                path,
                f"Network {k + 1} of {n_maps} of the group decomposition over all tasks: the "
                f"neurons with {rule} in its z-scored map, one panel per layer "
                + (f"(the first {N_MOSAICS} are drawn; " if n_maps > N_MOSAICS else "(")
                + "every network has a dashboard below).",
                voxels=True,
            )
        )
    counts = c.update(suffix="layercounts", extension=".tsv").fpath
    if counts.exists():
        table = ctx.table(counts)
        parts.append(
            ctx.figure(
                fig.layer_counts_plot(
                    table, ctx.figures / "key-neurons-per-layer.png", "key neurons per layer"
                ),
                f"Key neurons ({rule} in some network) per layer.",
            )
        )
    keys = c.update(suffix="keyneurons", extension=".tsv").fpath
    if keys.exists():
        table = ctx.table(keys)
        strongest = table.loc[table.z.abs().sort_values(ascending=False, kind="stable").index]
        parts.append("<p>Key neurons, strongest first (|z|):</p>" + _table(strongest))
    conn = c.update(suffix="connectivity", extension=".tsv").fpath
    if conn.exists():
        matrix = ctx.table(conn).set_index("component")
        parts.append(
            ctx.figure(
                fig.heatmap(
                    matrix, ctx.figures / "connectivity.png", "network connectivity (correlation)"
                ),
                "Correlation between the networks' time courses (nilearn "
                "ConnectivityMeasure), averaged over runs.",
            )
        )
    return ["\n".join(parts)]


def _dashboards(files: list[BIDSPath], ctx: _Context) -> list[str]:
    """One card per network: where it lives, its strongest neurons, the tokens that drive it."""
    c = _overall(files)
    keys_file = c.update(suffix="keyneurons", extension=".tsv").fpath if c else None
    if keys_file is None or not keys_file.exists():
        return []
    keys = ctx.table(keys_file)
    mixing_file = c.update(suffix="mixing", extension=".tsv").fpath
    mixing = ctx.table(mixing_file) if mixing_file.exists() else None
    n_maps = nib.load(c.fpath).shape[3] if mixing is None else None  # the header only
    columns = (
        [col for col in mixing.columns if col.startswith("comp-")]
        if mixing is not None
        else [f"comp-{k:02d}" for k in range(1, n_maps + 1)]
    )
    layers = ctx.table(c.update(suffix="layercounts", extension=".tsv").fpath).layer
    counts = (
        keys.groupby(["component", "layer"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=range(1, len(columns) + 1), columns=layers, fill_value=0)
    )
    counts.index = [f"network {k}" for k in counts.index]
    parts = [
        "<h2>Network dashboards</h2>",
        ctx.figure(
            fig.heatmap(
                counts,
                ctx.figures / "key-neurons-per-network-and-layer.png",
                "key neurons per network and layer",
                0,
                max(1, int(counts.to_numpy().max())),
                "viridis",
            ),
            "Where each network lives: its key neurons in each layer.",
        ),
    ]
    sources = _sidecar(c).get("Sources", [])
    raw = source_dataset(ctx.root)
    if mixing is None or raw is None:
        parts.append(
            "<p><em>The tokens that drive each network need the decomposition's time courses "
            "and the raw dataset's events; "
            + ("the raw dataset was not found." if raw is None else "there are no time courses.")
            + "</em></p>"
        )
    for k, column in enumerate(columns, start=1):
        members = keys[keys.component == k]
        strongest = members.loc[members.z.abs().sort_values(ascending=False).index]
        card = [
            f'<div class="card"><h3>Network {k}</h3>'
            f"<p>{len(members)} key neurons, {layer_span(counts.iloc[k - 1])}.</p>",
            "<p>Strongest neurons:</p>" + _table(strongest[["layer", "neuron", "z"]], 5),
        ]
        if mixing is not None and raw is not None:
            drivers = driving_tokens(
                mixing, sources, ctx.root, column, read=partial(ctx.table, read=read_events)
            )
            items = "".join(
                f"<li>{context_html(row)} <small>({html.escape(row.run)}, token "
                f"{row.position}, {row.value:.3g})</small></li>"
                for row in drivers.itertuples()
            )
            card.append(
                "<p>Tokens where its time course peaks, in context:</p>" + f"<ol>{items}</ol>"
            )
        parts.append("\n".join(card) + "</div>")
    return ["\n".join(parts)]


def _recurrence(files: list[BIDSPath], ctx: _Context) -> list[str]:
    sections = []
    for rec in files:
        table = ctx.table(rec.fpath)
        parts = ["<h2>Recurrence across tasks and runs</h2>"]
        tasks = table[table.scope == "task"]
        if not tasks.empty:
            names = sorted(set(tasks.reference) | set(tasks.other))
            matrix = pd.DataFrame(1.0, index=names, columns=names)
            for (a, b), g in tasks.groupby(["reference", "other"]):
                matrix.loc[a, b] = matrix.loc[b, a] = g.dice.mean()
            parts.append(
                ctx.figure(
                    fig.heatmap(
                        matrix,
                        ctx.figures / "recurrence-tasks.png",
                        "mean matched Dice between tasks",
                        0,
                        1,
                        "viridis",
                    ),
                    "Mean Dice of one-to-one matched networks (Hungarian on |spatial "
                    "correlation|) between the tasks' group decompositions.",
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
        maps = BIDSPath(
            subject=rec.subject, suffix="map", extension=".nii.gz", root=ctx.root
        ).match()
        frequency = [m for m in maps if m.description in RECURRENCE_DESCRIPTIONS]
        for freq in frequency:
            parts.append(
                ctx.figure(
                    fig.layer_mosaic(
                        fig.load_volume(freq.fpath),
                        ctx.figures / freq.update(extension=".png").basename,
                        "recurrence frequency",
                        cmap="viridis",
                        symmetric=False,
                    ),
                    "Fraction of single-run decompositions in which each neuron belongs to a "
                    f"network ({freq.basename}).",
                    voxels=True,
                )
            )
        sections.append("\n".join(parts))
    return sections


def _localizer(files: list[BIDSPath], ctx: _Context) -> list[str]:
    if not files:
        return []
    parts = ["<h2>Localizer (GLM)</h2>"]
    for z in files:
        ctx.params["localizer"] = _sidecar(z).get("Parameters", {})
        parts.append(
            ctx.figure(
                fig.layer_mosaic(
                    fig.load_volume(z.fpath),
                    ctx.figures / z.update(extension=".png").basename,
                    "contrast z-map",
                ),
                f"z-map of the contrast {ctx.params['localizer'].get('contrast', '')} "
                "(nilearn FirstLevelModel, no HRF, no drift, no smoothing).",
                voxels=True,
            )
        )
    for z in files:  # the units each contrast selected
        counts = z.update(
            contrast=None,
            stat=None,
            description=z.contrast,
            suffix="layercounts",
            extension=".tsv",
        ).fpath
        if counts.exists():
            parts.append(
                ctx.figure(
                    fig.layer_counts_plot(
                        ctx.table(counts),
                        ctx.figures / "localizer-units-per-layer.png",
                        "localizer units per layer",
                    ),
                    "Units selected by the localizer contrast, per layer.",
                )
            )
    return ["\n".join(parts)]


def _lesions(files: list[BIDSPath], ctx: _Context) -> list[str]:
    if not files:
        return []
    parts = ["<h2>Lesions versus random controls</h2>"]
    for les in files:
        table = ctx.table(les.fpath)
        params = _sidecar(les).get("Parameters", {})
        ctx.params.setdefault("lesion", params)
        parts.append(
            ctx.figure(
                fig.lesion_plot(
                    table, ctx.figures / les.update(extension=".png").basename, les.description
                ),
                f"Effect of masking the target set ({params.get('mode')}) next to "
                "size-matched random neuron sets; dashed: intact model.",
            )
        )
        parts.append(_table(table, 20))
    return ["\n".join(parts)]


def _keep_only(files: list[BIDSPath], ctx: _Context) -> list[str]:
    sections = []
    for keep in files:
        table = ctx.table(keep.fpath)
        figure = fig.keep_only_plot(table, ctx.figures / "keep-only.png", "keep-only curves")
        sections.append(
            "<h2>Keep only the key neurons</h2>"
            + ctx.figure(
                figure,
                "Metrics when only the top key neurons (by |z|) are kept, versus random sets of "
                "the same size.",
            )
            + _table(table, 30)
        )
    return sections


def _replication(files: list[BIDSPath], ctx: _Context) -> list[str]:
    summaries = [f for f in files if f.description == "summary"]
    if not summaries:
        return []
    summary = ctx.table(summaries[0].fpath)
    figure = fig.replication_plot(summary, ctx.figures / "replication.png")
    columns = [
        "study",
        "protocol",
        "masking",
        "mode",
        "fraction",
        "fraction_unmasked",
        "perplexity_target",
        "perplexity_controls_median",
        "n_controls",
        "controls_above_target",
        "pairs_target",
        "pairs_target_ci_low",
        "pairs_target_ci_high",
        "pairs_controls_mean",
    ]
    return [
        "<h2>Replication of the papers' protocols</h2>"
        + ctx.figure(
            figure,
            "Perplexity when the key set is kept or ablated, with llm2bids' masking (each layer "
            "its own mask) and with an emulation of the published code's defect (every layer "
            "the last layer's mask), next to random sets of the same size per layer.",
        )
        + _table(summary[columns], 40)
    ]


def _pruning(files: list[BIDSPath], ctx: _Context) -> list[str]:
    sections = []
    for p in files:
        table = ctx.table(p.fpath)
        note = ""
        if {"latency_dense_ms", "latency_pruned_ms"} <= set(table.columns):
            ratio = float(table.latency_pruned_ms.iloc[0]) / float(table.latency_dense_ms.iloc[0])
            note = (
                f"<p>Latency pruned / dense: {ratio:.2f}, from a single timing of one short "
                "sequence on the machine that ran this analysis"
                + (
                    ": the pruned model was not faster here. At that size timing noise and the "
                    "fixed cost of each layer dominate, so this says little; the benchmark "
                    "(benchmarks/RESULTS.md) times pruned models with repeats."
                    if ratio >= 1
                    else "."
                )
                + "</p>"
            )
        sections.append("<h2>Pruned model</h2>" + _table(table) + note)
    return sections


RECURRENCE_DESCRIPTIONS = tuple(f"{method}Recurrence" for method in METHODS)

#: The report, in order: each kind of section, found by the entities of its files.
SECTIONS = (
    Section({"suffix": "components", "extension": ".nii.gz"}, _networks),
    Section({"suffix": "components", "extension": ".nii.gz"}, _dashboards),
    Section({"suffix": "recurrence", "extension": ".tsv"}, _recurrence),
    Section({"suffix": "statmap", "stat": "z", "extension": ".nii.gz"}, _localizer),
    Section({"suffix": "lesion", "extension": ".tsv"}, _lesions),
    Section({"suffix": "keeponly", "extension": ".tsv"}, _keep_only),
    Section({"suffix": "pruning", "extension": ".tsv"}, _pruning),
    Section({"suffix": "replication", "extension": ".tsv"}, _replication),
)


def build_report(derivatives: str | Path, subject: str) -> Path:
    """Draw every figure and write ``sub-<subject>.html`` from the derivatives folder.

    Parameters
    ----------
    derivatives : str or Path
        A derivatives folder written by llm2bids.
    subject : str
        The subject (model) label.

    Returns
    -------
    Path
        The report.

    Raises
    ------
    DatasetError
        When the folder holds no derivatives of ``subject`` (nothing is written).
    """
    root = Path(derivatives)
    if not BIDSPath(subject=subject, root=root).match():
        known = subjects(root)
        raise DatasetError(
            f"{root} holds no derivatives of subject {subject!r}"
            + (f"; it has {', '.join(known)}." if known else "; is it a derivatives folder?")
        )
    ctx = _Context(root, figures_dir(root, subject))
    sections: list[str] = []
    for section in SECTIONS:
        files = BIDSPath(subject=subject, root=root, **section.query).match()
        sections += section.render(files, ctx)
    methods = _methods(ctx.params)
    label = html.escape(participant_id(subject))
    body = (
        f"<h1>llm2bids report: {label}</h1>"
        f'<p class="warn">{html.escape(NOT_BRAIN_DATA)}</p>'
        + _summary(ctx, subject)
        + "\n".join(sections)
        + f"<h2>Methods</h2><pre>{html.escape(methods)}</pre>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>llm2bids {label}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )
    out = report_path(root, subject)
    write_text(out, page)
    return out


def _summary(ctx: _Context, subject: str) -> str:
    """The opening card: model, tasks, tokens, networks, the headline lesion effect."""
    query = BIDSPath(subject=subject, root=ctx.root)
    overall = _overall(query.update(suffix="components", extension=".nii.gz").match())
    lesions = query.update(suffix="lesion", extension=".tsv").match()
    items = summary_items(ctx.root, subject, overall, lesions, ctx.table)
    if not items:
        return ""
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return f'<div class="card summary"><h2>Summary</h2><dl>{rows}</dl></div>'


_SOLVER_NAMES = {
    "picard": "Picard-O (python-picard; Ablin, Cardoso & Gramfort 2018)",
    "fastica": "scikit-learn's FastICA (cube contrast)",
}


def _methods(params: dict) -> str:
    import nilearn
    import torch
    import transformers

    net = params.get("networks", {})
    estimator = net.get("estimator", {})
    loc = params.get("localizer", {})
    recorded = HOOK_POINT_DESCRIPTIONS.get(params.get("hook_point"), "the recorded activations")
    return (
        f"Activations ({recorded}) of "
        f"{net.get('model_id', 'the model')} were recorded with llm2bids {__version__} "
        f"(transformers {transformers.__version__}, torch {torch.__version__}) and stored as a "
        "BIDS dataset in which each neuron is a voxel and each token a volume (RepetitionTime "
        "1 s by convention). Special tokens (BOS) were recorded and left out of all analyses.\n\n"
        f"Functional networks were estimated with nilearn {nilearn.__version__} "
        f"{str(net.get('method', 'canica')).upper()} (n_components = {net.get('n_components')}, "
        f"random_state = {net.get('random_state')}"
        + (
            f", ICA restarts solved by {_SOLVER_NAMES.get(estimator['ica_solver'])} with at "
            f"most {estimator.get('ica_max_iter')} iterations"
            if "ica_solver" in estimator
            else ""
        )
        + f", explicit neuron mask, smoothing_fwhm = "
        f"{estimator.get('smoothing_fwhm')}, standardize = {estimator.get('standardize')!r}"
        + (
            ", special tokens regressed out with spike regressors"
            if net.get("drop_special")
            else ""
        )
        + "). Component maps "
        f"were z-scored over neurons and sign-corrected; a neuron belongs to a network where "
        f"{_rule(net)}. Networks were matched across tasks and runs one to one "
        "(Hungarian assignment on |spatial correlation|) and compared with Dice and Jaccard "
        "against a permutation null.\n\n"
        + (
            f"A localizer contrast ({loc.get('contrast')}) was fitted with nilearn's "
            f"FirstLevelModel ({_arguments(loc.get('first_level', {}))}); units were "
            f"selected as {loc.get('selection')}.\n\n"
            if loc
            else ""
        )
        + _causal_methods(params.get("lesion", {}))
    )


def _arguments(options: dict) -> str:
    """``key = value`` pairs of the arguments a sidecar recorded."""
    return ", ".join(f"{key} = {value!r}" for key, value in options.items()) or "n/a"


def _causal_methods(lesion: dict) -> str:
    """What the lesion sidecars say was done (nothing when no lesion was run)."""
    if not lesion:
        return ""
    return (
        f"Causal tests set the selected neurons to {lesion.get('fill', 'zero')} at inference "
        f"({lesion.get('mode')}) and compared perplexity on {lesion.get('text')} (sliding "
        f"windows of {lesion.get('perplexity_window')} tokens, stride "
        f"{lesion.get('perplexity_stride')}), accuracy on {lesion.get('minimal_pairs')}, and "
        "greedy next-token accuracy with random neuron sets matched in size per layer "
        f"({lesion.get('n_controls')} controls)."
    )
