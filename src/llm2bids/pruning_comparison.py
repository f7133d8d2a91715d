"""``llm2bids compare-pruning``: do a model's networks survive pruning, and where?

One model, three recordings of the same stimuli in one dataset:

- ``sub-intact``: the model as it is;
- ``sub-masked<P>``: the model with only the top ``P`` % of each layer's MLP neurons at work
  (the others masked to zero: the same neurons, so the same geometry);
- ``sub-pruned<P>``: the same neurons cut out of the weights (a smaller model: another
  geometry, the same tokenizer).

The kept neurons are the top ``P`` % of each layer by ``|z|`` over the intact model's own
networks (the pruning paper's ranking, arXiv 2508.05239). The group level
(:func:`~llm2bids.decomposition.run_group_networks`) then compares the three: the intact
networks are matched to the pruned model's on the words both read, and to the masked model's
also neuron by neuron. ``acq-mlp_desc-pruning_survival.tsv`` says, per intact network, how
much of it was kept and what it was matched to in each variant.

A masked neuron still computes its activation (its output is zeroed): it is recorded as it
is, so the masked model's maps show where its remaining neurons send the signal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._docs import fill_doc
from .bids.names import acquisition_label
from .bids.path import BIDSPath
from .decomposition import FunctionalNetworks, GroupResult, run_group_networks
from .derivatives import provenance, write_table
from .evaluation import mask_neurons, prune, rank_neurons, top_neurons
from .exceptions import InputError
from .models import LoadedModel, load_model
from .models.loading import wrap_model
from .recording import record
from .report import build_group_report

logger = logging.getLogger("llm2bids.pruning_comparison")


@dataclass
class PruningComparison:
    """What :func:`compare_pruning` found.

    Attributes
    ----------
    survival : pandas.DataFrame
        Per intact network: ``n_members``, ``kept_share`` (of its members kept), and for each
        variant (``pruned``, ``masked``) the matched network, ``r`` (word-level), the null's
        95th percentile of the best matched ``|r|`` (``null_p95``) and whether the pair passes
        the null; ``masked_dice`` (the same neurons).
    group : GroupResult
        The group level's result (``similarity``: one row per pair of the three).
    files : dict of str to Path
        ``survival`` (the table), ``similarity``, ``report`` (the group report), ``bids`` (the
        raw dataset) and ``derivatives``.
    """

    survival: pd.DataFrame
    group: GroupResult
    files: dict


@fill_doc
def compare_pruning(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    output_dir: str | Path,
    model: str | LoadedModel | None = None,
    *,
    percent: int = 50,
    task: str = "narrative",
    max_tokens: int = 256,
    n_components: int = 10,
    seed: int = 0,
    n_permutations: int = 200,
    device: str = "auto",
    verbose: int = 1,
) -> PruningComparison:
    """Record a model intact, keep-masked and pruned, and compare their networks.

    See the module docstring for the three recordings and the table.

    Parameters
    ----------
    output_dir : str or Path
        Gets ``bids/`` (the three recordings) and ``bids/derivatives/llm2bids/`` (the group
        level's files and the survival table).
    model : str, LoadedModel or None, default=None
        ``None`` is the embedded SmolLM2-135M.
    percent : int, default=50
        Share of each layer's MLP neurons kept, in percent (1 to 99).
    task : str, default="narrative"
        The built-in task recorded.
    max_tokens : int, default=256
        Longest recorded run.
    n_components : int, default=10
        Networks per decomposition.
    %(seed)s
    n_permutations : int, default=200
        Size of the nulls.
    %(device)s
    %(verbose)s

    Returns
    -------
    PruningComparison
    """
    if not (isinstance(percent, int) and 0 < percent < 100):
        raise InputError(f"percent must be an integer from 1 to 99, got {percent!r}.")
    output_dir = Path(output_dir)
    bids = output_dir / "bids"
    deriv = bids / "derivatives" / "llm2bids"
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    options = dict(task=task, max_tokens=max_tokens, verbose=verbose, overwrite=True)
    record(bids, model=lm, subject="intact", **options)
    keep = _kept_neurons(bids, task, percent, n_components, seed)
    with mask_neurons(lm, keep, mode="keep"):
        record(bids, model=lm, subject=f"masked{percent}", **options)
    pruned = wrap_model(prune(lm, keep), lm.tokenizer, f"{lm.model_id} pruned to {percent}%")
    record(bids, model=pruned, subject=f"pruned{percent}", **options)
    del pruned
    group = run_group_networks(
        bids,
        deriv,
        tasks=[task],
        n_components=n_components,
        seed=seed,
        n_permutations=n_permutations,
        verbose=verbose,
    )
    survival = _survival(group, keep, percent)
    path = write_table(
        BIDSPath(
            acquisition=acquisition_label("mlp"),
            description="pruning",
            suffix="survival",
            extension=".tsv",
            root=deriv,
        ).fpath,
        survival,
        provenance(
            model_id=lm.model_id,
            percent=percent,
            task=task,
            max_tokens=max_tokens,
            n_components=n_components,
            seed=seed,
            n_permutations=n_permutations,
            ranking="top percent of each layer by |z| over the intact model's networks",
        )
        | {
            "Description": "Per network of the intact model: its members, the share of them "
            "kept, and the network of the pruned and of the keep-masked model matched to it "
            "(Hungarian, word-level time courses, circular-shift null); the masked model "
            "shares the neurons, so the Dice of the matched memberships too.",
        },
    )
    files = {
        "survival": path,
        "similarity": group.files["similarity"][0],
        "report": build_group_report(deriv),
        "bids": bids,
        "derivatives": deriv,
    }
    return PruningComparison(survival, group, files)


def _kept_neurons(bids, task, percent, n_components, seed) -> np.ndarray:
    """The top ``percent`` of each layer's neurons over the intact model's networks."""
    from .bids import find_runs

    runs = find_runs(bids, subject="intact", task=task)
    fit = FunctionalNetworks(n_components=n_components, random_state=seed).fit(runs)
    ranking = rank_neurons(fit.components_img_, fit.geometry_)
    geometry = fit.geometry_
    keep = top_neurons(
        ranking, percent / 100, geometry.n_layers, geometry.n_neurons, per_layer=True
    )
    if keep is None or not keep.any(axis=1).all():
        raise InputError(
            f"the top {percent}% of each layer keeps no neuron in some layer of a "
            f"{geometry.n_neurons}-neuron model; ask for a larger percent."
        )
    return keep


def _survival(group: GroupResult, keep: np.ndarray, percent: int) -> pd.DataFrame:
    """The survival table (see :class:`PruningComparison`)."""
    intact = group.fits["sub-intact"]
    members = intact.networks_  # (k, neurons) in masker order
    kept = keep.reshape(-1)[intact.geometry_.masker_order]
    table = pd.DataFrame({"network": np.arange(1, len(members) + 1)})
    table["n_members"] = members.sum(axis=1)
    inside = (members & kept).sum(axis=1)
    table["kept_share"] = np.round(np.divide(inside, np.maximum(table.n_members, 1)), 4)
    for name in ("pruned", "masked"):
        pairs = _pairs_with(
            group.temporal_matches, f"sub-{name}{percent}", "network_a", "network_b"
        ).set_index("intact")
        table[f"{name}_network"] = table.network.map(pairs.other)
        table[f"{name}_r"] = table.network.map(pairs.correlation)
        table[f"{name}_null_p95"] = table.network.map(pairs.null_p95)
        table[f"{name}_matched"] = table.network.map(pairs.matched)
    spatial = _pairs_with(
        group.spatial_matches, f"sub-masked{percent}", "component_a", "component_b"
    ).set_index("intact")
    table["masked_dice"] = table.network.map(spatial.dice)
    return table


def _pairs_with(matches: pd.DataFrame, other: str, col_a: str, col_b: str) -> pd.DataFrame:
    """The rows matching ``sub-intact`` with ``other``, as ``intact, other`` and the rest."""
    if matches.empty:
        return pd.DataFrame(
            columns=["intact", "other", "correlation", "null_p95", "matched", "dice"]
        )
    rows = []
    for first, second, a, b in (
        ("sub-intact", other, col_a, col_b),
        (other, "sub-intact", col_b, col_a),
    ):
        chosen = matches[(matches.unit_a == first) & (matches.unit_b == second)]
        rows.append(chosen.rename(columns={a: "intact", b: "other"}))
    return pd.concat(rows, ignore_index=True)
