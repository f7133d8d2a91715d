"""Figures drawn from the derivatives (matplotlib, no brain background)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

VOXEL_NOTE = (
    "A voxel is one MLP neuron (z = layer; x, y = position of the neuron in its layer's grid); "
    "a volume is one token."
)


def layer_mosaic(
    volume: np.ndarray,
    path: Path,
    title: str,
    cmap="RdBu_r",
    symmetric: bool = True,
    n_neurons: int | None = None,
) -> Path:
    """One panel per layer (z-slice) of a 3D map, no brain background.

    Parameters
    ----------
    volume : ndarray, shape (nx, ny, n_layers)
        One 3D map.
    path : Path
        The PNG to write (an SVG is written beside it).
    title : str
    cmap : str, default="RdBu_r"
    symmetric : bool, default=True
        Colour limits symmetric about 0.
    n_neurons : int or None, default=None
        Neurons per layer (to grey the padding); ``None`` shows every voxel.
    """
    n_layers = volume.shape[2]
    cols = min(10, n_layers)
    rows = math.ceil(n_layers / cols)
    vmax = float(np.nanmax(np.abs(volume))) or 1.0
    vmin = -vmax if symmetric else float(np.nanmin(volume))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows + 0.6), squeeze=False)
    for z, ax in enumerate(axes.flat):
        ax.axis("off")
        if z < n_layers:
            im = ax.imshow(
                volume[:, :, z].T,
                origin="lower",
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                interpolation="nearest",
            )
            ax.set_title(f"layer {z}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    return _save(fig, path)


def layer_counts_plot(counts: pd.DataFrame, path: Path, title: str) -> Path:
    """Bar chart of a per-layer count table (its second column).

    Parameters
    ----------
    counts : DataFrame
        ``layer, n_key_neurons`` rows.
    path : Path
        The PNG to write (an SVG is written beside it).
    title : str
    """
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(counts.layer, counts.iloc[:, 1])
    ax.set_xlabel("layer")
    ax.set_ylabel(counts.columns[1].replace("_", " "))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def heatmap(matrix: pd.DataFrame, path: Path, title: str, vmin=-1, vmax=1, cmap="RdBu_r") -> Path:
    """A labelled matrix (connectivity, recurrence between tasks, key neurons per layer).

    Parameters
    ----------
    matrix : DataFrame
        Labelled by its index (rows) and columns.
    path : Path
        The PNG to write (an SVG is written beside it).
    title : str
    vmin, vmax : float or None, default=(-1, 1)
        The colour scale's ends (``None``: the data's); correlations by default.
    cmap : str, default="RdBu_r"
    """
    fig, ax = plt.subplots(figsize=(1 + 0.45 * matrix.shape[1], 1 + 0.4 * matrix.shape[0]))
    im = ax.imshow(matrix.to_numpy(float), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _save(fig, path)


def lesion_plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Target versus random controls and the intact model, one panel per metric.

    Parameters
    ----------
    table : DataFrame
        A lesion table (one row per condition).
    path : Path
        The PNG to write (an SVG is written beside it).
    title : str
    """
    metrics = ["perplexity", "minimal_pair_accuracy", "next_token_accuracy"]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, metric in zip(axes, metrics):
        controls = table[table.condition == "control"][metric]
        ax.scatter(
            np.zeros(len(controls)) + np.linspace(-0.1, 0.1, len(controls)),
            controls,
            color="grey",
            label="random controls",
        )
        ax.scatter(
            [0],
            table[table.condition == "target"][metric],
            color="crimson",
            s=60,
            label="target",
            zorder=3,
        )
        ax.axhline(
            table[table.condition == "baseline"][metric].iloc[0],
            ls="--",
            color="k",
            label="intact model",
        )
        ax.set_xticks([])
        ax.set_title(metric.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def keep_only_plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Metrics against the fraction of neurons kept: top key neurons versus random sets.

    Parameters
    ----------
    table : DataFrame
        A keep-only table (rows per fraction and condition).
    path : Path
        The PNG to write (an SVG is written beside it).
    title : str
    """
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ["perplexity", "minimal_pair_accuracy"]):
        for cond, color in (("target", "crimson"), ("control", "grey")):
            sub = table[table.condition == cond].groupby("fraction")[metric].mean()
            ax.plot(
                sub.index * 100,
                sub.values,
                "o-",
                color=color,
                label="top key neurons" if cond == "target" else "random (mean)",
            )
        ax.set_xlabel("% of MLP neurons kept")
        ax.set_title(metric.replace("_", " "), fontsize=9)
        if metric == "perplexity":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def replication_plot(summary: pd.DataFrame, path: Path) -> Path:
    """Perplexity of each replication target, correct mask versus the published defect.

    Parameters
    ----------
    summary : DataFrame
        ``llm2bids replicate``'s summary table.
    path : Path
        The PNG to write (an SVG is written beside it).
    """
    correct = summary[summary.masking == "correct"].reset_index(drop=True)
    published = summary[summary.masking == "published"].reset_index(drop=True)
    labels = [
        f"{r.protocol if r.protocol != 'none' else r.study.split('(')[-1].rstrip(')')} "
        f"{r['mode']}"
        + (
            f" top {float(r.fraction):.0%}"
            if pd.notna(pd.to_numeric(r.fraction, errors="coerce"))
            else ""
        )
        + f" ({float(r.fraction_unmasked):.0%} left)"
        for _, r in correct.iterrows()
    ]
    y = np.arange(len(correct))[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(correct) + 1.2))
    ax.hlines(
        y,
        correct.perplexity_controls_min,
        correct.perplexity_controls_max,
        color="grey",
        lw=4,
        alpha=0.5,
        label="random sets of the same size (range)",
    )
    ax.scatter(correct.perplexity_target, y, color="crimson", zorder=3, label="key set")
    ax.scatter(
        published.perplexity_target,
        y,
        facecolors="none",
        edgecolors="darkorange",
        zorder=3,
        label="key set, published masking defect (emulated)",
    )
    ax.axvline(summary.perplexity_intact.iloc[0], ls="--", color="k", label="intact model")
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("perplexity on the held-out text (log)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, not over, the rows
    return _save(fig, path)


def load_volume(path: Path) -> np.ndarray:
    """A NIfTI image's data as float32 (3D or 4D)."""
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return path
