"""``llm2bids networks``: the functional-network analysis as a BIDS App."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from sklearn.base import clone
from tqdm.auto import tqdm

from .._docs import fill_doc
from .._parallel import cluster_n_jobs, dask_cluster, parallel_map
from ..bids.geometry import VoxelGeometry
from ..bids.names import acquisition_label
from ..bids.path import BIDSPath, by_role
from ..bids.reader import check_same_geometry, run_metadata, select_runs, special_mask
from ..derivatives import (
    Staging,
    bids_uri,
    check_output_dir,
    ignore_in_derivatives,
    init_derivatives,
    input_fingerprint,
    provenance,
    write_img,
    write_table,
)
from ..overlap import compare_fits, recurrence_frequency
from .networks import FunctionalNetworks, check_n_components, membership_rule

logger = logging.getLogger("llm2bids.decomposition")


@fill_doc
def run_networks(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    output_dir: str | Path,
    *,
    participant_label: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    method: str = "canica",
    n_components: int | Sequence[int] = 20,
    threshold: float = 3.0,
    seed: int = 0,
    n_jobs: int = 1,
    per_run: bool = True,
    n_permutations: int = 100,
    hook_point: str = "mlp",
    verbose: int = 1,
    scope: str = "model",
    sided: str = "two",
    ica_solver: str = "picard",
    ica_max_iter: int | None = None,
    dask_scheduler: str | None = None,
) -> dict[str, list[Path]]:
    """Find functional networks per model and task, across tasks, and test their recurrence.

    For each subject (model): one group decomposition per task and one over all tasks; per
    task, one decomposition per run matched to the task's group networks; every pair of tasks
    matched with each other. Writes components, mixing, atlas (dseg/probseg), key neurons,
    per-layer counts, connectivity, recurrence tables and recurrence-frequency maps.

    Parameters
    ----------
    %(bids_dir)s
    %(output_dir)s
    %(participant_label)s
    tasks : sequence of str or None, default=None
        Tasks to analyse; ``None`` takes every recorded one.
    method : {"canica", "dictlearning"}, default="canica"
    n_components : int or sequence of int, default=20
        A sequence sweeps the counts and stacks their components (key neurons: the union).
    threshold : float, default=3.0
        z from which a neuron belongs to a network.
    %(seed)s
    n_jobs : int, default=1
        Processes for the decompositions that can run side by side (single-run fits, the
        layers of ``scope="layer"``, a sweep) or for nilearn's per-run reductions; ``-1``:
        all cores (all Dask workers with ``dask_scheduler``). Results do not depend on it.
    per_run : bool, default=True
        Also decompose each run on its own and match it to its task's networks.
    n_permutations : int, default=100
        Size of the permutation null of the recurrence tests.
    %(hook_point)s
    %(verbose)s
    scope : {"model", "layer"}, default="model"
        One decomposition over all layers, or one per layer (see
        :class:`~llm2bids.decomposition.FunctionalNetworks`).
    sided : {"two", "one"}, default="two"
        ``|z| >= threshold``, or ``z >= threshold`` on each map's heavy tail.
    ica_solver : {"picard", "fastica"}, default="picard"
        Solver of CanICA's ICA restarts; ``"fastica"`` is nilearn's own (see
        :class:`~llm2bids.decomposition.FunctionalNetworks`).
    ica_max_iter : int or None, default=None
        Iterations of one ICA restart; ``None``: the solver's default.
    dask_scheduler : str or None, default=None
        Address of a running Dask scheduler (``tcp://HOST:PORT``): the parallel work runs on
        its workers (joblib's ``dask`` backend; ``n_jobs`` 1 then means all of them).

    Returns
    -------
    dict of str to NetworksResult
        Subject label -> what was written for it (``.files``, by role), as the other apps
        return their results.
    """
    template = FunctionalNetworks(
        method=method,
        n_components=n_components,
        threshold=threshold,
        random_state=seed,
        n_jobs=n_jobs,
        scope=scope,
        sided=sided,
        ica_solver=ica_solver,
        ica_max_iter=ica_max_iter,
    )
    template.check_params()  # before anything is read or written
    check_output_dir(bids_dir, output_dir)
    selected = select_runs(bids_dir, participant_label, tasks, hook_point)
    for by_task in selected.values():  # check everything before writing anything
        all_runs = [r for runs in by_task.values() for r in runs]
        check_same_geometry(all_runs)
        check_n_components(max(template.component_counts), [special_mask(r) for r in all_runs])
    template.set_params(n_jobs=cluster_n_jobs(n_jobs, dask_scheduler))
    with dask_cluster(dask_scheduler):  # reached (or refused) before anything is written
        output_dir = init_derivatives(output_dir, bids_dir)
        results = {}
        for sub, by_task in selected.items():
            written = _networks_of_subject(
                sub,
                by_task,
                template,
                output_dir,
                bids_dir,
                hook_point,
                _RecurrenceOptions(per_run, n_permutations, verbose),
            )
            results[sub] = NetworksResult(by_role(written))
    return results


@dataclass
class NetworksResult:
    """What ``run_networks`` wrote for one subject.

    Attributes
    ----------
    files : dict of str to list of Path
        The files, by role (their BIDS suffix): ``components``, ``mixing``, ``keyneurons``,
        ``layercounts``, ``dseg``, ``probseg``, ``connectivity``, ``recurrence`` and ``map``
        (recurrence frequency); a role has one file per task, and one over all tasks.
    """

    files: dict[str, list[Path]]

    def over_all_tasks(self, role: str) -> Path:
        """The file of ``role`` of the fit over all tasks (the one without a ``task-``).

        Parameters
        ----------
        role : str
            A BIDS suffix, e.g. ``"keyneurons"``.
        """
        found = [p for p in self.files.get(role, []) if BIDSPath.from_path(p).task is None]
        if len(found) != 1:
            raise KeyError(f"no single {role} file over all tasks among {self.files.get(role)}")
        return found[0]


#: Parameters that say how a fit ran, never what it found: left out of the sidecars, so that
#: serial, parallel and cluster runs write the same derivatives.
RUNTIME_PARAMS = ("n_jobs", "verbose")


def _results_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in RUNTIME_PARAMS}


@dataclass
class _Maps:
    """What the recurrence tests need of a fit (kept, not the fit, when a step is staged)."""

    components_: np.ndarray
    networks_: np.ndarray
    runs_: list
    geometry_: VoxelGeometry


def _maps(fit: FunctionalNetworks) -> _Maps:
    return _Maps(fit.components_, fit.networks_, fit.runs_, fit.geometry_)


def _fit_and_write(template, runs, base, params, bids_dir) -> tuple[_Maps, list[Path]]:
    fit = clone(template).fit(runs)
    return _maps(fit), write_networks(fit, base, params, bids_dir)


@dataclass(frozen=True)
class _RecurrenceOptions:
    """How recurrence is tested: per run or not, with how many permutations; progress bars."""

    per_run: bool
    n_permutations: int
    verbose: int


def _networks_of_subject(
    sub, by_task, template, output_dir, bids_dir, hook_point, options: _RecurrenceOptions
) -> list[Path]:
    """One subject's decompositions (per task, over all tasks) and their recurrence.

    Everything is written to a staging folder and published at the end (see
    :class:`~llm2bids.derivatives.Staging`): an interruption leaves the earlier derivatives
    as they were, and a rerun with the same inputs and parameters resumes after the last
    finished fit.
    """
    written: list[Path] = []
    fits = {}
    model_id = run_metadata(next(iter(by_task.values()))[0]).get("ModelID", "n/a")
    params = _results_params(template.get_params()) | {
        "estimator": _results_params(template.estimator_params()),
        "model_id": model_id,
    }
    acq = acquisition_label(hook_point)
    stage = Staging(
        output_dir,
        BIDSPath(
            subject=sub, acquisition=acq, description=template.method, suffix="networks"
        ).basename,
        {
            "params": params,
            "runs": {t: input_fingerprint(runs) for t, runs in by_task.items()},
            "per_run": options.per_run,
            "n_permutations": options.n_permutations,
        },
    )
    recording = BIDSPath(subject=sub, acquisition=acq, root=stage.root)
    bar = tqdm(total=len(by_task) + 1, desc=f"{sub} networks", disable=not options.verbose)
    for task, runs in by_task.items():
        base = recording.update(task=task)
        fits[task], files = stage.step(
            f"group fit of {task}",
            functools.partial(_fit_and_write, template, runs, base, params, bids_dir),
        )
        written += files
        bar.update()
    all_runs = [r for runs in by_task.values() for r in runs]
    if len(by_task) > 1:
        all_params = params | {"tasks": sorted(by_task)}
        # also the reference of the seed comparison
        fits["__all__"], files = stage.step(
            "group fit of all tasks",
            functools.partial(_fit_and_write, template, all_runs, recording, all_params, bids_dir),
        )
        written += files
    bar.update()
    bar.close()
    written += _recurrence(stage, recording, by_task, fits, template, params, options)
    moved = stage.publish()
    # Functional derivatives need a task entity, which the atlas over all tasks cannot have:
    # its dseg/probseg files are hidden from the validator by name (the per-task ones are
    # checked).
    published = [BIDSPath.from_path(p) for p in moved.values()]
    ignore_in_derivatives(
        output_dir,
        [p.basename for p in published if p.suffix in ("dseg", "probseg") and p.task is None],
    )
    return [moved[p] for p in written]


@fill_doc
def write_networks(
    fit: FunctionalNetworks,
    base: BIDSPath,
    params: dict,
    bids_dir: str | Path,
    label: str | None = None,
) -> list[Path]:
    """Write one fit's derivatives, named after ``base`` (the derivatives root and entities).

    Parameters
    ----------
    fit : FunctionalNetworks
        A fitted decomposition.
    base : BIDSPath
        The derivatives root and the entities the files are named with.
    params : dict
        The ``Parameters`` of the sidecars.
    %(bids_dir)s
    label : str or None, default=None
        The ``desc`` and ``atlas`` label; ``None``: the fit's method.
    """
    desc = label or fit.method
    sources = [bids_uri(r, bids_dir) for r in fit.runs_]
    side = provenance(**params) | {"Sources": sources}
    return _fit_files(fit, base.update(description=desc), side) + _atlas_files(
        fit, base.update(atlas=desc), side
    )


def _fit_files(fit: FunctionalNetworks, described: BIDSPath, side: dict) -> list[Path]:
    """The maps, time courses, key neurons, layer counts and connectivity of a fit."""
    out = [
        write_img(
            described.update(suffix="components", extension=".nii.gz").fpath,
            fit.components_img_,
            side
            | {
                "Description": "z-scored, sign-corrected component maps (one volume "
                "per component); a voxel is a neuron (see the raw sidecar's mapping).",
                "ComponentLayer": fit.component_info_.layer.tolist(),
                "ComponentDecomposition": [
                    f"{n} components" for n in fit.component_info_.n_components
                ],
                "SolverCallsNotConverged": fit.convergence_warnings_,
            },
        ),
        write_table(
            described.update(suffix="mixing", extension=".tsv").fpath,
            fit.mixing_,
            side
            | {
                "Description": _mixing_description(fit.drop_special),
                "run": {"Description": "The run, from 1: its position in Sources."},
            },
        ),
        write_table(
            described.update(suffix="keyneurons", extension=".tsv").fpath,
            fit.key_neurons_,
            side
            | {
                "Description": f"Neurons with {membership_rule(fit.sided, fit.threshold)} "
                "in a component map.",
                "layer": {"Description": "Layer index (z)."},
                "neuron": {"Description": "Neuron index in the layer."},
                "component": {"Description": "Network (component) index, from 1."},
                "z": {"Description": "z-score of the neuron in the component map."},
                "n_networks": {"Description": "Number of networks the neuron belongs to."},
            },
        ),
        write_table(
            described.update(suffix="layercounts", extension=".tsv").fpath,
            fit.layer_counts(),
            side | {"Description": "Key neurons per layer."},
        ),
    ]
    out.append(
        write_table(
            described.update(suffix="connectivity", extension=".tsv").fpath,
            connectivity(fit),
            side
            | {
                "Description": "Correlation between network time courses (nilearn ConnectivityMeasure, mean over runs, special tokens dropped).",
                "ConnectivityMeasure": CONNECTIVITY,
            },
        )
    )
    return out


def _mixing_description(drop_special: bool) -> str:
    """What ``mixing.tsv`` holds, and how nilearn reproduces it."""
    text = (
        "Component time courses per run; one row per token: each token's activations fitted "
        "on the component maps by least squares"
    )
    if drop_special:
        return text + (
            ", the special tokens regressed out. nilearn's NiftiMapsMasker on the components "
            "image gives the same values with one indicator column per special token as "
            "confounds."
        )
    return text + ". nilearn's NiftiMapsMasker on the components image gives the same values."


def _atlas_files(fit: FunctionalNetworks, atlas: BIDSPath, side: dict) -> list[Path]:
    """The atlas of a fit: each neuron labelled with its strongest network (0: none), the
    labels' names and the memberships (one volume per network)."""
    geom = fit.geometry_
    out = []
    z = np.where(fit.networks_, np.abs(fit.components_), 0)
    labels = np.where(fit.networks_.any(0), z.argmax(0) + 1, 0)
    dseg = np.zeros(geom.shape, dtype=np.int16)
    dseg[geom.mask] = labels
    out.append(
        write_img(
            atlas.update(suffix="dseg", extension=".nii.gz").fpath,
            nib.Nifti1Image(dseg, geom.affine),
            side,
        )
    )
    k = fit.components_.shape[0]
    out.append(
        write_table(
            atlas.update(suffix="dseg", extension=".tsv").fpath,
            pd.DataFrame(
                {
                    "index": np.arange(k + 1),
                    "name": ["none"] + [f"network-{i:02d}" for i in range(1, k + 1)],
                }
            ),
        )
    )
    out.append(
        write_img(
            atlas.update(suffix="probseg", extension=".nii.gz").fpath,
            fit.maps_to_img(fit.networks_.astype(np.float32)),
            side | {"Description": "Network memberships (1 inside), one volume per network."},
        )
    )
    return out


#: The nilearn ConnectivityMeasure of the connectivity tables (stated in their sidecars:
#: nilearn's default standardize gives other values).
CONNECTIVITY = {"kind": "correlation", "standardize": "zscore_sample"}


def connectivity(fit: FunctionalNetworks) -> pd.DataFrame:
    """Mean correlation between the networks' time courses over runs (nilearn connectome)."""
    from nilearn.connectome import ConnectivityMeasure

    comps = [c for c in fit.mixing_.columns if c.startswith("comp-")]
    series = [g.loc[g.special == 0, comps].to_numpy() for _, g in fit.mixing_.groupby("run")]
    measure = ConnectivityMeasure(**CONNECTIVITY).fit(series)
    mean = np.asarray(measure.mean_)
    frame = pd.DataFrame(np.round(mean, 4), columns=comps)
    frame.insert(0, "component", comps)
    return frame


def _fit_single_run(template: FunctionalNetworks, run: Path) -> _Maps:
    """``template`` fitted on one run, in one process (the runs are what runs in parallel)."""
    return _maps(clone(template).set_params(n_jobs=1).fit([run]))


def _refit(template: FunctionalNetworks, runs, seed: int) -> _Maps:
    return _maps(clone(template).set_params(random_state=seed).fit(runs))


def _recurrence(
    stage: Staging,
    recording: BIDSPath,
    by_task,
    fits,
    template: FunctionalNetworks,
    params: dict,
    options: _RecurrenceOptions,
) -> list[Path]:
    """Match networks across seeds, tasks and single runs; write the table and the maps."""
    n_permutations = options.n_permutations
    compare = functools.partial(_compare, n_permutations=n_permutations, seed=template.random_state)
    rows = [_seed_rows(stage, fits, template, compare)]
    fits = {t: f for t, f in fits.items() if t != "__all__"}
    tasks = sorted(fits)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            table = compare(fits[a], fits[b])
            rows.append(table.assign(scope="task", reference=f"task-{a}", other=f"task-{b}"))
    written = []
    for task, runs in by_task.items():
        if options.per_run and len(runs) >= 2:
            fit_runs = functools.partial(
                parallel_map,
                functools.partial(_fit_single_run, template),
                runs,
                n_jobs=template.n_jobs,
                desc=f"{recording.subject} {task} single-run fits",
                verbose=options.verbose,
            )
            run_fits = stage.step(f"single-run fits of {task}", fit_runs)
            frequency = recording.update(
                task=task,
                description=f"{template.method}Recurrence",
                suffix="map",
                extension=".nii.gz",
            )
            run_rows, frequency_map = _run_recurrence(
                frequency, runs, run_fits, fits[task], compare, params
            )
            rows += run_rows
            written.append(frequency_map)
    table = pd.concat(rows, ignore_index=True)
    first = ["scope", "reference", "other"]
    written.append(
        write_table(
            recording.update(
                description=template.method, suffix="recurrence", extension=".tsv"
            ).fpath,
            table[first + [c for c in table.columns if c not in first]],
            provenance(**params, n_permutations=n_permutations)
            | {
                "Description": "Networks matched one to one (Hungarian on |spatial correlation|) "
                "between two seeds of the largest decomposition (scope seed), between tasks, and "
                "between each run's own decomposition and its task's group "
                "networks; p_value against the best matched Dice of networks with shuffled "
                "neurons (permutation null)."
            },
        )
    )
    return written


def _compare(a: _Maps, b: _Maps, n_permutations: int, seed: int) -> pd.DataFrame:
    """Networks of two fits matched one to one (see :func:`compare_fits`)."""
    return compare_fits(
        a.components_, b.components_, a.networks_, b.networks_, n_permutations, seed
    )


def _seed_rows(stage: Staging, fits, template: FunctionalNetworks, compare) -> pd.DataFrame:
    """The largest decomposition refitted with the next seed and matched to the first."""
    seed = template.random_state
    ref_label, ref_fit = (
        ("all-tasks", fits["__all__"])
        if "__all__" in fits
        else next((f"task-{t}", f) for t, f in fits.items())
    )
    reseeded = stage.step(
        f"refit with seed {seed + 1}", functools.partial(_refit, template, ref_fit.runs_, seed + 1)
    )
    return compare(ref_fit, reseeded).assign(
        scope="seed", reference=f"{ref_label} seed-{seed}", other=f"{ref_label} seed-{seed + 1}"
    )


def _run_recurrence(frequency: BIDSPath, runs, run_fits, group: _Maps, compare, params: dict):
    """Each run's own decomposition matched to its task's group networks, and the map (written
    to ``frequency``) of how often each neuron belongs to some network across the runs: the
    rows and the map."""
    task = frequency.task
    rows = [
        compare(group, fit).assign(
            scope="run", reference=f"task-{task}", other=f"run-{BIDSPath.from_path(run).run:02d}"
        )
        for run, fit in zip(runs, run_fits)
    ]
    geom = group.geometry_
    data = np.zeros(geom.shape, dtype=np.float32)
    data[geom.mask] = recurrence_frequency([f.networks_ for f in run_fits])
    frequency_map = write_img(
        frequency.fpath,
        nib.Nifti1Image(data, geom.affine),
        provenance(**params)
        | {
            "Description": "Per neuron, the fraction of single-run "
            "decompositions in which it belongs to some network.",
            "NRuns": len(runs),
        },
    )
    return rows, frequency_map
