"""What a reader of the report looks at first: a summary card and one dashboard per network.

A network's dashboard says where it lives (key neurons per layer), which neurons weigh most in
it, and which tokens drive it: the time points where its time course peaks, each shown in
its surrounding text read from the raw runs' ``events.tsv``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .._io import read_json
from ..bids.events import read_events
from ..bids.reader import events_path
from ..derivatives import resolve_bids_uri

#: Tokens shown before and after a driving token.
CONTEXT_BEFORE, CONTEXT_AFTER = 10, 4


def source_dataset(derivatives: Path) -> Path | None:
    """The raw dataset the derivatives were computed from (``SourceDatasets``), if reachable.

    Parameters
    ----------
    derivatives : Path
        A derivatives folder written by llm2bids.
    """
    description = derivatives / "dataset_description.json"
    if not description.exists():
        return None
    for source in read_json(description).get("SourceDatasets", []):
        url = str(source.get("URL", ""))
        if url.startswith("file://"):
            path = Path(url[len("file://") :])
            path = path if path.is_absolute() else derivatives / path
            if (path / "dataset_description.json").exists():
                return path.resolve()
    return None


def driving_tokens(
    mixing: pd.DataFrame,
    sources: list[str],
    derivatives: Path,
    component: str,
    n: int = 5,
    read: Callable[[Path], pd.DataFrame] = read_events,
) -> pd.DataFrame:
    """The ``n`` ordinary tokens where a component's time course is largest, in their text.

    Parameters
    ----------
    mixing : pandas.DataFrame
        A ``_mixing.tsv`` table (``run`` from 1, ``volume``, ``special``, ``comp-XX``).
    sources : list of str
        The decomposition's ``Sources`` (``bids:raw:<path>`` of each run, in ``run`` order).
    derivatives : Path
        The derivatives dataset, whose ``DatasetLinks`` resolve the sources.
    component : str
        The column, for example ``"comp-01"``.
    n : int, default=5
    read : callable, default=read_events
        Reads a run's ``_events.tsv`` (the report passes one that reads each file once for
        all its networks).

    Returns
    -------
    pandas.DataFrame
        ``run, position, before, token, after, value``, strongest first.
    """
    ordinary = mixing[mixing.special == 0]
    rows, events = [], {}
    for _, peak in ordinary.nlargest(n, component).iterrows():
        bold = resolve_bids_uri(sources[int(peak.run) - 1], derivatives)
        if bold not in events:
            events[bold] = read(events_path(bold))
        tokens = events[bold].token.tolist()
        v = int(peak.volume)
        rows.append(
            {
                "run": bold.name.split("_bold")[0],
                "position": v,
                "before": "".join(tokens[max(0, v - CONTEXT_BEFORE) : v]),
                "token": tokens[v],
                "after": "".join(tokens[v + 1 : v + 1 + CONTEXT_AFTER]),
                "value": float(peak[component]),
            }
        )
    return pd.DataFrame(rows, columns=["run", "position", "before", "token", "after", "value"])


def context_html(row) -> str:
    """One driving token in its text, the token highlighted."""
    return (
        f'<span class="ctx">{html.escape(row.before)}<mark>{html.escape(row.token)}</mark>'
        f"{html.escape(row.after)}</span>"
    )


def layer_span(counts: pd.Series) -> str:
    """``"layers 3-17, most in 12"`` from key-neuron counts indexed by layer."""
    present = counts[counts > 0]
    if present.empty:
        return "no key neurons"
    first, last = int(present.index.min()), int(present.index.max())
    where = f"layer {first}" if first == last else f"layers {first}-{last}"
    return f"{where}, most in {int(present.idxmax())}"


def summary_items(
    root: Path, subject: str, overall, lesions: list, read_table: Callable[[Path], pd.DataFrame]
) -> list[tuple[str, str]]:
    """The report's opening card: (label, text) pairs from the derivatives and the raw data.

    Parameters
    ----------
    root : Path
        The derivatives folder.
    subject : str
    overall : BIDSPath or None
        The decomposition the report shows.
    lesions : list of BIDSPath
        The subject's lesion tables (the first gives the headline).
    read_table : callable
        ``read_table(path)``: a TSV as a DataFrame (the report's, which reads each once).
    """
    from ..bids.dataset import read_participants
    from ..bids.path import BIDSPath, participant_id
    from ..evaluation.lesion import summarize

    items = []
    raw = source_dataset(root)
    if raw is not None:
        people = read_participants(raw)
        row = people[people.participant_id == participant_id(subject)]
        if not row.empty:
            model = row.iloc[0]
            revision = model.get("revision", "n/a")
            items.append(("Model", f"{model.get('model_id', subject)} (revision {revision})"))
    tasks = sorted({f.task for f in BIDSPath(subject=subject, root=root).match() if f.task})
    if tasks:
        items.append(("Tasks", ", ".join(tasks)))
    if overall is not None:
        mixing = overall.update(suffix="mixing", extension=".tsv").fpath
        if mixing.exists():
            frame = read_table(mixing)
            items.append(
                (
                    "Tokens analysed",
                    f"{int((frame.special == 0).sum()):,} in {frame.run.nunique()} runs "
                    "(special tokens left out)",
                )
            )
        keys = overall.update(suffix="keyneurons", extension=".tsv").fpath
        counts = overall.update(suffix="layercounts", extension=".tsv").fpath
        if keys.exists() and counts.exists():
            table = read_table(keys)
            n_key = len(table.drop_duplicates(["layer", "neuron"]))
            layer_table = read_table(counts)
            total = n_key / layer_table.fraction.sum() * len(layer_table) if n_key else 0
            share = f" ({100 * n_key / total:.1f}% of the neurons)" if total else ""
            items.append(
                (
                    "Networks",
                    f"{table.component.nunique()} networks ({overall.description}); "
                    f"{n_key:,} key neurons{share}",
                )
            )
    if lesions:
        table = read_table(lesions[0].fpath)
        if {"baseline", "target", "control"} <= set(table.condition):
            ppl = summarize(table)["perplexity"]
            n_controls = int((table.condition == "control").sum())
            items.append(
                (
                    "Lesion",
                    f"{lesions[0].description}: perplexity {ppl['baseline']:.4g} intact, "
                    f"{ppl['target']:.4g} with the network masked, {ppl['control_mean']:.4g} "
                    f"on average with {n_controls} random sets of the same size "
                    f"(p = {ppl['p_controls_as_extreme']:.2g})",
                )
            )
    return items
