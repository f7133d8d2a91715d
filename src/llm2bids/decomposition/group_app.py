"""``llm2bids networks BIDS_DIR OUTPUT_DIR group``: networks compared across models.

The unit of the group level is one recording of one model: a subject (``sub-``), or each of
its sessions (``ses-``: checkpoints, revisions) where it has them. For every unit, its own
decomposition over the selected tasks (as the participant level fits it). Then:

- **every pair of units** is matched on the words of the stimuli both read (the time courses
  brought to words, Hungarian assignment on ``|r|``, a circular-shift null; see
  :mod:`llm2bids.overlap.temporal`): this works across widths, layers and tokenizers;
- **units of one architecture and geometry** (neuron ``(layer, j)`` is the same unit in
  each) also get a group decomposition over all their runs, each unit's own version of every
  group network (dual regression, :func:`~llm2bids.decomposition.dual_regression`), and
  their own networks matched by spatial correlation and Dice against a permutation null
  (:func:`~llm2bids.overlap.compare_fits`).

Dataset-level files (no ``sub-`` entity) sit at the root of the derivatives:
``acq-<hook>_desc-<method>_similarity.tsv`` (one row per pair of units),
``..._temporalmatches.tsv`` and ``..._spatialmatches.tsv`` (every matched pair), and per
same-neuron group the fit over its units, named ``desc-group<arch><L>x<N><method>``
(components, mixing, key neurons, layer counts, connectivity, atlas); each unit's dual
regression is written in its own folder with the same ``desc``, beside its word-level time
courses (``desc-<method>_wordtimecourses.tsv``).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from tqdm.auto import tqdm

from .._docs import fill_doc
from ..bids.names import acquisition_label
from ..bids.path import BIDSPath, by_role
from ..bids.reader import special_mask
from ..bids.units import Kind, Unit, group_label, group_units, same_neuron_groups, unit_kind
from ..derivatives import (
    bids_uri,
    check_output_dir,
    ignore_in_derivatives,
    init_derivatives,
    provenance,
    write_img,
    write_table,
)
from ..exceptions import InputError
from ..overlap import compare_fits, compare_models, words_of_mixing
from .app import RUNTIME_PARAMS, write_networks
from .group import SubjectNetworks, check_min_correlation, dual_regression
from .networks import FunctionalNetworks, check_n_components

logger = logging.getLogger("llm2bids.decomposition")


@dataclass
class GroupResult:
    """What the group level found and wrote.

    Attributes
    ----------
    similarity : pandas.DataFrame
        One row per pair of units (``unit_a``, ``unit_b``): ``matched_share`` and
        ``mean_matched_abs_r`` of the word-level matching, their product ``similarity`` (the
        expected matched ``|r|`` of a network, unmatched ones counting 0), ``n_words``; for
        units of one architecture and geometry also ``spatial_matched_share`` and ``spatial_mean_dice``.
    files : dict of str to list of Path
        The files written, by role (their BIDS suffix).
    subjects : dict of str to SubjectNetworks
        Unit label -> its version of its same-neuron group's networks (dual regression).
    fits : dict of str to FunctionalNetworks
        Unit label -> its own decomposition (whose networks the matches number from 1).
    temporal_matches, spatial_matches : pandas.DataFrame
        The tables of ``temporalmatches.tsv`` and ``spatialmatches.tsv``.
    """

    similarity: pd.DataFrame
    files: dict[str, list[Path]] = field(default_factory=dict)
    subjects: dict[str, SubjectNetworks] = field(default_factory=dict)
    fits: dict[str, FunctionalNetworks] = field(default_factory=dict)
    temporal_matches: pd.DataFrame = field(default_factory=pd.DataFrame)
    spatial_matches: pd.DataFrame = field(default_factory=pd.DataFrame)

    def nearest(self, unit: str) -> str:
        """The unit most similar to ``unit`` (the highest ``similarity``).

        Parameters
        ----------
        unit : str
            A unit label (``sub-X`` or ``sub-X_ses-Y``).
        """
        table = self.similarity
        rows = table[(table.unit_a == unit) | (table.unit_b == unit)]
        if rows.empty:
            raise KeyError(f"{unit} is not among {sorted(set(table.unit_a) | set(table.unit_b))}")
        best = rows.loc[rows.similarity.idxmax()]
        return best.unit_b if best.unit_a == unit else best.unit_a


@fill_doc
def run_group_networks(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    output_dir: str | Path,
    *,
    participant_label: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    method: str = "canica",
    n_components: int = 20,
    threshold: float = 3.0,
    sided: str = "two",
    ica_solver: str = "picard",
    ica_max_iter: int | None = None,
    seed: int = 0,
    n_permutations: int = 100,
    min_correlation: float = 0.5,
    hook_point: str = "mlp",
    verbose: int = 1,
) -> GroupResult:
    """Compare the networks of several models (the BIDS-Apps ``group`` level).

    See the module docstring for what is fitted and written.

    Parameters
    ----------
    %(bids_dir)s
    %(output_dir)s
    %(participant_label)s
    tasks : sequence of str or None, default=None
        Tasks whose runs are decomposed (together, per unit); ``None`` takes every one.
    method : {"canica", "dictlearning"}, default="canica"
    n_components : int, default=20
    threshold : float, default=3.0
        z from which a neuron belongs to a network.
    sided : {"two", "one"}, default="two"
        ``|z| >= threshold``, or ``z >= threshold`` on each map's heavy tail.
    ica_solver : {"picard", "fastica"}, default="picard"
        Solver of CanICA's ICA restarts.
    ica_max_iter : int or None, default=None
        Iterations of one ICA restart; ``None``: the solver's default.
    %(seed)s
    n_permutations : int, default=100
        Size of the nulls (circular shifts for the word-level matching, permutations for the
        spatial one), as the participant level's.
    min_correlation : float, default=0.5
        Dual regression: least ``|r|`` between a neuron and the unit's network time course
        for the neuron to be a member there (see
        :func:`~llm2bids.decomposition.dual_regression`).
    %(hook_point)s
    %(verbose)s

    Returns
    -------
    GroupResult
    """
    template = FunctionalNetworks(
        method=method,
        n_components=n_components,
        threshold=threshold,
        random_state=seed,
        sided=sided,
        ica_solver=ica_solver,
        ica_max_iter=ica_max_iter,
    )
    template.check_params()
    check_min_correlation(min_correlation)
    check_output_dir(bids_dir, output_dir)
    units = group_units(bids_dir, participant_label, tasks, hook_point)
    kinds = {}
    for unit in units:  # everything is checked before anything is fitted or written
        kinds[unit] = unit_kind(unit)
        check_n_components(n_components, [special_mask(r) for r in unit.runs])
    _check_shared_tasks(units)
    bar = tqdm(total=len(units), desc="group: units", disable=not verbose)
    fits = {}
    for unit in units:
        fits[unit] = clone(template).fit(list(unit.runs))
        bar.update()
    bar.close()
    study = _Study(template, units, fits, kinds, n_permutations, seed)
    temporal = study.temporal_matches()
    spatial = study.spatial_matches()
    groups = {g: members for g, members in study.same_neuron_groups().items() if len(members) > 1}
    group_fits = {g: clone(template).fit([r for u in m for r in u.runs]) for g, m in groups.items()}
    subjects = {
        u.label: dual_regression(group_fits[g], list(u.runs), min_correlation)
        for g, members in groups.items()
        for u in members
    }
    output_dir = init_derivatives(output_dir, bids_dir)
    writer = _GroupWriter(
        output_dir,
        bids_dir,
        acquisition_label(hook_point),
        template,
        units,
        {"n_permutations": n_permutations, "min_correlation": min_correlation},
    )
    similarity = _similarity(temporal, spatial)
    written = writer.tables(similarity, temporal, spatial)
    written += writer.word_courses(study.words)
    for g, members in groups.items():
        written += writer.group_fit(group_fits[g], g, members, subjects)
    return GroupResult(
        similarity,
        by_role(written),
        subjects,
        {u.label: fits[u] for u in units},
        temporal,
        spatial,
    )


def _check_shared_tasks(units: list[Unit]) -> None:
    """Refuse two units that read no common task: their networks share no words."""
    tasks = {u: {BIDSPath.from_path(r).task for r in u.runs} for u in units}
    for a, b in itertools.combinations(units, 2):
        if not tasks[a] & tasks[b]:
            raise InputError(
                f"{a.label} ({', '.join(sorted(tasks[a]))}) and {b.label} "
                f"({', '.join(sorted(tasks[b]))}) were recorded on no common task, so their "
                "networks share no words to be compared on: record both on one task, or "
                "select the units that share one (--participant-label, --tasks)."
            )


@dataclass
class _Study:
    """The units, their own fits, and the matchings between them."""

    template: FunctionalNetworks
    units: list[Unit]
    fits: dict
    kinds: dict
    n_permutations: int
    seed: int

    def same_neuron_groups(self) -> dict[Kind, list[Unit]]:
        """Units by architecture and geometry: those whose neuron (layer, j) is one unit."""
        return same_neuron_groups(self.units, self.kinds)

    @functools.cached_property
    def words(self) -> dict[Unit, pd.DataFrame]:
        """Each unit's network time courses on the words of its stimuli."""
        return {u: words_of_mixing(self.fits[u].mixing_, list(u.runs)) for u in self.units}

    def temporal_matches(self) -> pd.DataFrame:
        """Every pair of units matched on the words both read."""
        words = self.words
        rows = []
        for a, b in itertools.combinations(self.units, 2):
            matching, _ = compare_models(words[a], words[b], self.n_permutations, self.seed)
            rows.append(_labelled(matching, a, b))
        return pd.concat(rows, ignore_index=True)

    def spatial_matches(self) -> pd.DataFrame:
        """Every pair of units of one architecture and geometry matched by their maps and
        memberships."""
        rows = []
        for members in self.same_neuron_groups().values():
            for a, b in itertools.combinations(members, 2):
                fa, fb = self.fits[a], self.fits[b]
                table = compare_fits(
                    fa.components_,
                    fb.components_,
                    fa.networks_,
                    fb.networks_,
                    self.n_permutations,
                    self.seed,
                )
                rows.append(_labelled(table, a, b))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _labelled(table: pd.DataFrame, a: Unit, b: Unit) -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"unit_a": a.label, "unit_b": b.label}, index=table.index), table], axis=1
    )


def _similarity(temporal: pd.DataFrame, spatial: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of units: the word-level similarity, and the spatial one if any."""
    pairs = temporal.groupby(["unit_a", "unit_b"], sort=False)
    table = pairs.agg(
        matched_share=("matched", "mean"),
        n_words=("n_words", "first"),
    ).reset_index()
    table["mean_matched_abs_r"] = [
        float(g.loc[g.matched, "correlation"].abs().mean()) if g.matched.any() else 0.0
        for _, g in pairs
    ]
    table["spatial_matched_share"] = np.nan
    table["spatial_mean_dice"] = np.nan
    if not spatial.empty:
        for (a, b), g in spatial.groupby(["unit_a", "unit_b"], sort=False):
            at = (table.unit_a == a) & (table.unit_b == b)
            table.loc[at, "spatial_matched_share"] = float(g["recurs"].mean())
            table.loc[at, "spatial_mean_dice"] = float(g["dice"].mean())
    # the expected matched |r| of a network of the pair (unmatched networks count 0)
    table["similarity"] = table.matched_share * table.mean_matched_abs_r
    columns = [
        "similarity",
        "matched_share",
        "mean_matched_abs_r",
        "spatial_matched_share",
        "spatial_mean_dice",
    ]
    table[columns] = table[columns].round(4)
    return table[["unit_a", "unit_b", "n_words", *columns]]


class _GroupWriter:
    """Writes the group level's files (see the module docstring)."""

    def __init__(self, output_dir, bids_dir, acq, template, units, extra: dict):
        self.root = BIDSPath(acquisition=acq, root=output_dir)
        self.bids_dir = bids_dir
        self.template = template
        self.params = (
            {k: v for k, v in template.get_params().items() if k not in RUNTIME_PARAMS}
            | extra
            | {"units": [u.label for u in units]}
        )
        self.sources = [bids_uri(r, bids_dir) for u in units for r in u.runs]

    def tables(self, similarity, temporal, spatial) -> list[Path]:
        side = provenance(**self.params) | {"Sources": self.sources}
        base = self.root.update(description=self.template.method, extension=".tsv")
        out = [
            write_table(
                base.update(suffix="similarity").fpath,
                similarity,
                side
                | {
                    "Description": "Model-by-model similarity: per pair of units, the share "
                    "of networks matched beyond the null on the words both read, the mean "
                    "|r| of the matched pairs, their product (similarity), and for units of "
                    "one architecture and geometry the share of networks matched by Dice "
                    "beyond the permutation null.",
                },
            ),
            write_table(
                base.update(suffix="temporalmatches").fpath,
                temporal,
                side
                | {
                    "Description": "Networks of two units matched one to one (Hungarian) by "
                    "the correlation of their word-level time courses (the mean over each "
                    "word's tokens); null: circular shifts within each stimulus document.",
                },
            ),
        ]
        if not spatial.empty:
            out.append(
                write_table(
                    base.update(suffix="spatialmatches").fpath,
                    spatial,
                    side
                    | {
                        "Description": "Networks of two units of one architecture and "
                        "geometry matched one to one by spatial correlation, with Dice of "
                        "their memberships against a permutation null (family-wise p).",
                    },
                )
            )
        return out

    def word_courses(self, words: dict) -> list[Path]:
        """Each unit's own network time courses on words (what the matching compared)."""
        out = []
        for unit, table in words.items():
            path = self.root.update(
                subject=unit.subject,
                session=unit.session,
                description=self.template.method,
                suffix="wordtimecourses",
                extension=".tsv",
            ).fpath
            side = provenance(**self.params) | {
                "Sources": [bids_uri(r, self.bids_dir) for r in unit.runs],
                "Description": "This unit's own networks' time courses on words: the mean over "
                "each word's tokens (special tokens left out), by stimulus file and word index "
                "(events.tsv's stim_file and word).",
            }
            out.append(write_table(path, table.reset_index(), side))
        return out

    def group_fit(self, fit, kind: Kind, members, subjects) -> list[Path]:
        """The fit over a same-neuron group's units, and each unit's dual regression."""
        label = group_label(kind.architecture, kind.geometry, self.template.method)
        params = self.params | {"units": [u.label for u in members]}
        written = write_networks(fit, self.root, params, self.bids_dir, label=label)
        # a dataset-level atlas has no task and no subject, which BIDS cannot place (see
        # run_networks): hidden from the validator by name, with its sidecar
        atlas = [p for p in written if BIDSPath.from_path(p).suffix in ("dseg", "probseg")]
        ignore_in_derivatives(self.root.root, _with_sidecars(atlas))
        for unit in members:
            written += self._dual_regression(fit, unit, subjects[unit.label], label, params)
        return written

    def _dual_regression(self, fit, unit, result: SubjectNetworks, label, params) -> list[Path]:
        base = self.root.update(subject=unit.subject, session=unit.session, description=label)
        side = provenance(**params) | {"Sources": [bids_uri(r, self.bids_dir) for r in unit.runs]}
        maps = write_img(
            base.update(suffix="components", extension=".nii.gz").fpath,
            fit.maps_to_img(result.maps.astype(np.float32)),
            side
            | {
                "Description": f"This unit's version of the {label} group networks (dual "
                "regression: spatial, then temporal regression), z-scored over neurons.",
            },
        )
        members = write_img(
            base.update(suffix="probseg", extension=".nii.gz").fpath,
            fit.maps_to_img(result.networks.astype(np.float32)),
            side
            | {
                "Description": "Memberships (1 inside): past the group fit's threshold in "
                "this unit's map, where the neuron correlates with the unit's network time "
                "course at |r| >= min_correlation.",
            },
        )
        ignore_in_derivatives(self.root.root, _with_sidecars([members]))
        return [maps, members]


def _with_sidecars(paths: list[Path]) -> list[str]:
    """The names of ``paths`` and of their JSON sidecars."""
    names = [p.name for p in paths]
    return names + sorted({n.split(".")[0] + ".json" for n in names})
