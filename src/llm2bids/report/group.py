"""``group.html``: the group level's report, built from its derivatives alone.

The model-by-model similarity matrix, the similarity table, and for the closest pairs their
matched networks side by side with their word-level time courses over the shared text.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import write_text
from ..bids.dataset import NOT_BRAIN_DATA
from ..bids.path import BIDSPath
from ..bids.units import parse_unit_label
from ..exceptions import DatasetError
from . import figures as fig
from .figures import plt
from .html import CSS, _figure, _table

#: Pairs of units shown side by side (the most similar first), networks per pair, and words
#: of their time courses drawn.
N_PAIRS, N_NETWORKS, N_WORDS = 3, 3, 200


def build_group_report(derivatives: str | Path, method: str = "canica") -> Path:
    """Draw the group level's figures and write ``group.html`` from the derivatives folder.

    Parameters
    ----------
    derivatives : str or Path
        A derivatives folder where ``llm2bids networks ... group`` wrote.
    method : {"canica", "dictlearning"}, default="canica"
        The decomposition whose comparison is shown.

    Returns
    -------
    Path
        The report.
    """
    root = Path(derivatives)
    tables = BIDSPath(description=method, suffix="similarity", extension=".tsv")
    found = tables.match_dataset_level(root)
    if not found:
        raise DatasetError(
            f"{root} holds no group-level similarity table of {method} (written by "
            f"`llm2bids networks BIDS_DIR {root} group`): run that first."
        )
    similarity_path = found[0].fpath
    acq = found[0].acquisition
    figures = root / "figures" / "group"
    similarity = pd.read_csv(similarity_path, sep="\t")
    matches = pd.read_csv(found[0].update(suffix="temporalmatches").fpath, sep="\t")
    parts = [
        _figure(
            _similarity_matrix(similarity, figures / "similarity.png"),
            "Model-by-model similarity: the share of networks matched beyond the null on the "
            "words both models read, times their mean matched |r|.",
            root,
        ),
        _table(similarity, n=50),
    ]
    for _, pair in similarity.sort_values("similarity", ascending=False).head(N_PAIRS).iterrows():
        parts.append(_pair_section(root, figures, acq, method, pair, matches))
    body = (
        "<h1>llm2bids group report</h1>"
        f'<p class="warn">{html.escape(NOT_BRAIN_DATA)}</p>' + "\n".join(parts)
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>llm2bids group</title><style>{CSS}</style></head><body>{body}</body></html>"
    )
    out = root / "group.html"
    write_text(out, page)
    return out


def _similarity_matrix(similarity: pd.DataFrame, path: Path) -> Path:
    units = sorted(set(similarity.unit_a) | set(similarity.unit_b))
    matrix = pd.DataFrame(np.eye(len(units)), index=units, columns=units)
    for _, row in similarity.iterrows():
        matrix.loc[row.unit_a, row.unit_b] = matrix.loc[row.unit_b, row.unit_a] = row.similarity
    return fig.heatmap(matrix, path, "similarity", vmin=0, vmax=1, cmap="viridis")


def _pair_section(root, figures, acq, method, pair, matches) -> str:
    """One pair of units: their matched networks and word-level time courses."""
    a, b = pair.unit_a, pair.unit_b
    rows = matches[(matches.unit_a == a) & (matches.unit_b == b)]
    matched = rows[rows.matched]
    shown = matched.loc[matched.correlation.abs().sort_values(ascending=False).index]
    title = f"{a} and {b}: similarity {pair.similarity:.3f}"
    parts = [f"<h2>{html.escape(title)}</h2>", _table(rows, n=64)]
    courses = {u: _word_courses(root, u, acq, method) for u in (a, b)}
    if all(c is not None for c in courses.values()) and len(shown):
        path = figures / f"{a}_{b}_timecourses.png"
        parts.append(
            _figure(
                _time_courses(courses[a], courses[b], shown.head(N_NETWORKS), a, b, path),
                f"The {min(N_NETWORKS, len(shown))} most correlated matched networks of {a} "
                f"and {b}: their word-level time courses (z-scored) over the first "
                f"{N_WORDS} words both read.",
                root,
            )
        )
    return '<div class="card">' + "".join(parts) + "</div>"


def _word_courses(root: Path, unit: str, acq: str, method: str) -> pd.DataFrame | None:
    """A unit's ``wordtimecourses.tsv`` (``None`` when absent)."""
    subject, session = parse_unit_label(unit)
    path = BIDSPath(
        subject=subject,
        session=session,
        acquisition=acq,
        description=method,
        suffix="wordtimecourses",
        extension=".tsv",
        root=root,
    ).fpath
    if not path.exists():
        return None
    return pd.read_csv(path, sep="\t").set_index(["stim_file", "word"])


def _time_courses(a: pd.DataFrame, b: pd.DataFrame, pairs, name_a, name_b, path) -> Path:
    common = a.index.intersection(b.index).sort_values()[:N_WORDS]
    fig_, axes = plt.subplots(len(pairs), 1, figsize=(9, 1.8 * len(pairs)), squeeze=False)
    for ax, (_, row) in zip(axes[:, 0], pairs.iterrows()):
        x = a.loc[common, f"comp-{int(row.network_a):02d}"].to_numpy(float)
        y = b.loc[common, f"comp-{int(row.network_b):02d}"].to_numpy(float)
        sign = np.sign(row.correlation) or 1.0
        ax.plot(_z(x), lw=0.9, label=f"{name_a} network {int(row.network_a)}")
        ax.plot(sign * _z(y), lw=0.9, label=f"{name_b} network {int(row.network_b)}")
        ax.set_title(f"r = {row.correlation:.2f}", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
    axes[-1, 0].set_xlabel("word")
    return fig._save(fig_, path)


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() or 1.0)
