"""Lesion studies: a neuron set's effect next to size-matched random controls."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._docs import fill_doc
from ..bids.dataset import read_participants, require_dataset
from ..bids.names import strip_prefix
from ..bids.path import BIDSPath, participant_id
from ..bids.reader import find_runs, run_metadata
from ..derivatives import check_output_dir, init_derivatives, provenance, write_table
from ..exceptions import DatasetError, InputError, check_choice, check_positive_int
from ..models import LoadedModel, load_model
from ..models.hooks import hook_point_of, layer_count, neurons_per_layer
from ..models.identity import check_same_model
from ..stimuli import heldout_text
from .masking import MODES, mask_neurons, neuron_means, protect_layers
from .metrics import PERPLEXITY_STRIDE, PERPLEXITY_WINDOW, minimal_pair_accuracy, perplexity
from .minimal_pairs import minimal_pairs
from .neuronsets import (
    check_set_file,
    random_controls,
    read_neuron_set,
    set_entities,
    top_neurons,
    top_shortfall,
)
from .texts import calibration_label, read_text_file, resolve_texts

logger = logging.getLogger("llm2bids.evaluation")

METRICS = ("perplexity", "next_token_accuracy", "minimal_pair_accuracy")
#: The intact model's row of a lesion table (its metrics follow).
BASELINE = {"condition": "baseline", "seed": "n/a", "mode": "none", "n_neurons": 0}


@dataclass
class LesionResult:
    """One subject's lesion study; unpacks (and indexes) as the pair ``table, summary``.

    Attributes
    ----------
    table : DataFrame
        One row per condition (baseline, target, controls) with the metrics.
    summary : dict
        Target versus controls for each metric (see :func:`summarize`).
    files : dict of str to Path
        What was written, by role (``lesion``: the table; its sidecar holds the summary).
    """

    table: pd.DataFrame
    summary: dict
    files: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.table, self.summary))

    def __getitem__(self, index):
        return (self.table, self.summary)[index]

    def __len__(self) -> int:
        return 2


@fill_doc
def evaluate(
    lm: LoadedModel,
    text: str | None = None,
    pairs: pd.DataFrame | None = None,
    window: int = PERPLEXITY_WINDOW,
    stride: int = PERPLEXITY_STRIDE,
) -> dict:
    """Perplexity and greedy next-token accuracy on ``text`` and minimal-pair accuracy.

    Parameters
    ----------
    %(lm)s
    %(text)s
    %(pairs)s
    window, stride : int, default=256, 128
        Perplexity's sliding windows (see :func:`~llm2bids.evaluation.perplexity`).
    """
    text = heldout_text() if text is None else text
    pairs = minimal_pairs() if pairs is None else pairs
    return perplexity(lm, text, window, stride) | minimal_pair_accuracy(lm, pairs)


def check_lesion_params(mode: str, n_controls: int) -> None:
    """Refuse a lesion mode or control count that cannot work, naming the parameter.

    Parameters
    ----------
    mode : {"ablate", "keep"}
    n_controls : int
        Random control sets; at least 1.

    Raises
    ------
    InputError
    """
    check_choice("mode", mode, MODES)
    check_positive_int("n_controls", n_controls)


@fill_doc
def lesion_study(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    lm: LoadedModel,
    target: np.ndarray,
    mode: str = "ablate",
    n_controls: int = 5,
    seed: int = 0,
    text: str | None = None,
    pairs: pd.DataFrame | None = None,
    verbose: int = 1,
    *,
    fill: str = "zero",
    calibration_text: str | None = None,
    protected_layers: Sequence[int] = (),
    hook_point: str = "mlp",
    masker=mask_neurons,
    baseline: bool = True,
    window: int = PERPLEXITY_WINDOW,
    stride: int = PERPLEXITY_STRIDE,
) -> pd.DataFrame:
    """Evaluate the intact model, the target set and ``n_controls`` random sets of its size.

    Parameters
    ----------
    %(lm)s
    target : ndarray of bool, shape (n_layers, n_neurons)
        The neuron set.
    mode : {"ablate", "keep"}, default="ablate"
        Mask the set, or every neuron but the set.
    %(n_controls)s
    %(seed)s
    %(text)s
    %(pairs)s
    %(verbose)s
    %(fill)s
    %(calibration_text)s
    %(protected_layers)s
    %(hook_point_mask)s
    masker : callable, default=mask_neurons
        ``masker(model, neurons, mode=, means=, hook_point=)``, a context manager that masks
        during forward passes (:func:`~llm2bids.evaluation.mask_neurons`; the replication
        passes an emulation of the published code's defective one).
    baseline : bool, default=True
        Evaluate the intact model too (its row comes first).
    window, stride : int, default=256, 128
        Perplexity's sliding windows (see :func:`~llm2bids.evaluation.perplexity`).

    Returns
    -------
    pandas.DataFrame
        One row per condition: ``condition`` (``baseline``, ``target``, ``control``),
        ``seed``, ``mode``, ``n_neurons`` (in the set, that is in the masked model for
        ``keep``) and the metrics.
    """
    check_lesion_params(mode, n_controls)
    text, calibration = resolve_texts(text, calibration_text, fill)
    target = protect_layers(target, protected_layers, mode)
    means = neuron_means(lm, calibration, hook_point=hook_point) if fill == "mean" else None
    rows = [BASELINE | evaluate(lm, text, pairs, window, stride)] if baseline else []
    sets = [("target", "n/a", target)] + [
        ("control", seed + i, c) for i, c in enumerate(random_controls(target, n_controls, seed))
    ]
    for condition, s, neurons in tqdm(sets, desc=f"{mode} study", disable=not verbose):
        with masker(lm.model, neurons, mode=mode, means=means, hook_point=hook_point):
            rows.append(
                {"condition": condition, "seed": s, "mode": mode, "n_neurons": int(neurons.sum())}
                | evaluate(lm, text, pairs, window, stride)
            )
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict:
    """Target versus controls for each metric: control mean, sd, z of the target, rank p."""
    out = {}
    target = table[table.condition == "target"].iloc[0]
    controls = table[table.condition == "control"]
    baseline = table[table.condition == "baseline"].iloc[0]
    for metric in METRICS:
        c = controls[metric].to_numpy(float)
        sd = c.std(ddof=1) if len(c) > 1 else float("nan")
        worse = c >= target[metric] if metric == "perplexity" else c <= target[metric]
        out[metric] = {
            "baseline": float(baseline[metric]),
            "target": float(target[metric]),
            "n_controls": len(c),
            "control_mean": float(c.mean()),
            "control_sd": float(sd),
            "target_z": float((target[metric] - c.mean()) / sd) if sd and sd > 0 else None,
            "p_controls_as_extreme": float((1 + worse.sum()) / (1 + len(c))),
        }
    return out


def controls_text(metric: dict, spec: str = ".4g") -> str:
    """``"controls m ± sd"`` of one metric of :func:`summarize`; one control has no spread.

    Parameters
    ----------
    metric : dict
        One metric's entry of :func:`summarize`.
    spec : str, default=".4g"
        The format of the numbers.
    """
    mean = format(metric["control_mean"], spec)
    if metric["n_controls"] < 2:
        return f"1 control {mean} (no spread from one control; pass n_controls (--n-controls) of 2 or more)"
    return f"controls {mean} ± {format(metric['control_sd'], spec)}"


@fill_doc
def keep_only_curve(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    lm: LoadedModel,
    ranking: pd.DataFrame,
    fractions: Sequence[float],
    n_controls: int = 3,
    seed: int = 0,
    text=None,
    pairs=None,
    verbose: int = 1,
    *,
    per_layer: bool = False,
    fill: str = "zero",
    calibration_text: str | None = None,
    protected_layers: Sequence[int] = (),
    hook_point: str = "mlp",
    masker=mask_neurons,
) -> pd.DataFrame:
    """Keep only the top ``fraction`` of neurons (ranked by |z|) versus random sets of that size.

    Parameters
    ----------
    %(lm)s
    ranking : DataFrame
        ``layer, neuron, z`` (see :func:`~llm2bids.evaluation.rank_neurons`).
    fractions : sequence of float
        Fractions of all neurons to keep.
    n_controls : int, default=3
        Random sets per fraction.
    %(seed)s
    %(text)s
    %(pairs)s
    %(verbose)s
    per_layer : bool, default=False
        Top ``fraction`` of each layer rather than of the whole model (see
        :func:`~llm2bids.evaluation.top_neurons`).
    %(fill)s
    %(calibration_text)s
    %(protected_layers)s
        The fraction is taken before protection, so protected layers add to what is kept.
    %(hook_point_mask)s
    masker : callable, default=mask_neurons
        See :func:`lesion_study`.

    Returns
    -------
    DataFrame
        :func:`lesion_study`'s rows (baseline first, once) with ``fraction``.
    """
    n_layers = layer_count(lm.model)
    n_neurons = neurons_per_layer(lm.model, hook_point)[0]
    options = dict(
        fill=fill,
        calibration_text=calibration_text,
        protected_layers=protected_layers,
        hook_point=hook_point,
        masker=masker,
    )
    rows = []
    for fraction in fractions:
        target = top_neurons(ranking, fraction, n_layers, n_neurons, per_layer=per_layer)
        if target is None:
            logger.warning(
                "keep-only %.3g skipped: %s",
                fraction,
                top_shortfall(ranking, fraction, n_layers, n_neurons, per_layer),
            )
            continue
        study = lesion_study(
            lm,
            target,
            "keep",
            n_controls,
            seed,
            text,
            pairs,
            verbose,
            **options,
            baseline=not rows,
        )
        rows.append(study.assign(fraction=np.where(study.condition == "baseline", 1.0, fraction)))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _participant_model(bids_dir: Path, sub: str) -> str:
    participants = read_participants(bids_dir)
    row = participants[participants.participant_id == participant_id(sub)]
    if row.empty or "model_spec" not in row:
        raise DatasetError(
            f"participants.tsv has no model_spec for {participant_id(sub)}; pass --model."
        )
    return row.iloc[0]["model_spec"]


def _check_recorded_model(bids_dir: Path, sub: str, source: BIDSPath, hook_point, lm) -> None:
    """Refuse ``lm`` unless it is the model the subject's recording (of the set) was made with."""
    runs = find_runs(
        bids_dir, subject=sub, task=source.task, hook_point=hook_point, session=source.session
    )
    if not runs:
        raise DatasetError(
            f"{bids_dir} holds no {hook_point} recording of {participant_id(sub)}"
            + (f" for task {source.task!r}" if source.task else "")
            + ": the neuron set must come from a recording of that subject (check "
            "--participant-label)."
        )
    check_same_model(run_metadata(runs[0]), lm, runs[0].name)


@fill_doc
def run_lesion(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    output_dir: str | Path,
    networks: str | Path,
    *,
    participant_label: Sequence[str] | None = None,
    mode: str = "ablate",
    n_controls: int = 5,
    component: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    model: str | LoadedModel | None = None,
    text_file: str | Path | None = None,
    verbose: int = 1,
    fill: str = "zero",
    calibration_file: str | Path | None = None,
    protected_layers: Sequence[int] = (),
    threshold: float | None = None,
) -> dict[str, LesionResult]:
    """Lesion (or keep only) a neuron set in each subject's model; write TSV + JSON.

    The model is the one recorded for the subject (``participants.tsv`` ``model_spec``)
    unless ``model`` is given. The set's hook point is that of the networks file's ``acq-``
    entity (``acq-mlpout``: MLP output dimensions; otherwise MLP neurons). Writes ``<networks entities>_desc-<desc><Mode>_lesion.tsv``
    with one row per condition and a sidecar with the target-versus-control summary.

    Parameters
    ----------
    %(bids_dir)s
    %(output_dir)s
    networks : str or Path
        The neuron set: a key-neuron TSV, a dseg atlas or a stat map (see
        :func:`~llm2bids.evaluation.read_neuron_set`).
    %(participant_label)s
    mode : {"ablate", "keep"}, default="ablate"
    %(n_controls)s
    %(component)s
    %(seed)s
    %(device)s
    %(dtype)s
    model : str, LoadedModel or None, default=None
        The model; ``None`` loads each subject's ``model_spec`` from ``participants.tsv``.
    text_file : str, Path or None, default=None
        Text for perplexity; ``None`` is the built-in held-out text.
    %(verbose)s
    %(fill)s
    calibration_file : str, Path or None, default=None
        Text file for the means of ``fill="mean"``; ``None`` is the built-in recording
        stimuli. It must not overlap the evaluation text.
    %(protected_layers)s
    threshold : float or None, default=None
        For a stat map or component map: the set is the neurons at or above it (needed
        there; ignored for tables and atlases).

    Returns
    -------
    dict
        Subject label -> :class:`LesionResult` (which unpacks as ``table, summary``).
    """
    check_lesion_params(mode, n_controls)  # before any file is read or model loaded
    bids_dir = require_dataset(bids_dir)
    check_output_dir(bids_dir, output_dir)
    networks = check_set_file(networks, "networks")
    source = set_entities(networks)
    subjects = _lesion_subjects(bids_dir, participant_label, source)
    text, calibration = _lesion_texts(text_file, calibration_file, fill)
    hook_point = "mlp_out" if hook_point_of(source.acquisition) == "mlp_out" else "mlp"
    pairs = minimal_pairs()
    output_dir = init_derivatives(output_dir, bids_dir)
    settings = {  # what the sidecars state of every subject's study
        "networks": str(networks),
        "component": component,
        "threshold": threshold,
        "mode": mode,
        "n_controls": n_controls,
        "seed": seed,
        "hook_point": hook_point,
        "fill": fill,
        "calibration": calibration_label(fill == "mean", calibration_file),
        "protected_layers": list(protected_layers),
    }
    results = {}
    for sub in subjects:
        lm = _subject_model(model, bids_dir, sub, device, dtype)
        _check_recorded_model(bids_dir, sub, source, hook_point, lm)
        target = read_neuron_set(
            networks,
            layer_count(lm.model),
            neurons_per_layer(lm.model, hook_point)[0],
            component=component,
            threshold=threshold,
        )
        table = lesion_study(
            lm,
            target,
            mode,
            n_controls,
            seed,
            text,
            pairs,
            verbose=verbose,
            fill=fill,
            calibration_text=calibration,
            protected_layers=protected_layers,
            hook_point=hook_point,
        )
        summary = summarize(table)
        written = write_table(
            _lesion_path(source, sub, component, mode, output_dir),
            table,
            provenance(
                **settings,
                model_id=lm.model_id,
                perplexity_window=int(table.window.iloc[0]),
                perplexity_stride=int(table.stride.iloc[0]),
                text="built-in held-out text" if text is None else str(text_file),
                minimal_pairs=(
                    f"built-in templated minimal pairs ({pairs.phenomenon.nunique()} phenomena, "
                    f"{len(pairs)} pairs)"
                ),
            )
            | {"Summary": summary}
            | _sources(networks, output_dir),
        )
        results[sub] = LesionResult(table, summary, {"lesion": written})
    return results


def _lesion_texts(text_file, calibration_file, fill: str) -> tuple[str | None, str | None]:
    """The evaluation and calibration texts (None: built-in), refused before any model loads
    when the fill is bad or the texts overlap."""
    text = None if text_file is None else read_text_file(text_file, "evaluation text")
    calibration = (
        None if calibration_file is None else read_text_file(calibration_file, "calibration text")
    )
    resolve_texts(text, calibration, fill)
    return text, calibration


def _subject_model(model, bids_dir: Path, sub: str, device: str, dtype: str) -> LoadedModel:
    """The model given, or the one recorded for ``sub`` (``participants.tsv`` model_spec)."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(model or _participant_model(bids_dir, sub), device=device, dtype=dtype)


def _lesion_subjects(bids_dir: Path, participant_label, source: BIDSPath) -> list[str]:
    """The subjects to lesion: those asked for, else the set's own, else every subject."""
    if participant_label:
        return [strip_prefix(p) for p in participant_label]
    if source.subject is not None:
        return [source.subject]
    return [strip_prefix(p) for p in read_participants(bids_dir).participant_id]


def _lesion_path(source: BIDSPath, sub: str, component, mode: str, output_dir: Path) -> Path:
    """``<the set's entities>_desc-<set><Comp k><Mode>_lesion.tsv`` in ``output_dir``."""
    desc = (source.description or "set") + (f"Comp{component}" if component else "")
    return BIDSPath(
        subject=sub,
        task=source.task,
        acquisition=source.acquisition,
        description=desc + mode.capitalize(),
        suffix="lesion",
        extension=".tsv",
        root=output_dir,
    ).fpath


def _sources(networks, output_dir) -> dict:
    """``Sources`` of a lesion table: the neuron set, where it is a file of the derivatives."""
    from ..derivatives import bids_uri

    if isinstance(networks, np.ndarray):
        return {}
    try:
        return {"Sources": [bids_uri(networks, output_dir, name="")]}
    except InputError:  # a set outside the derivatives has no BIDS URI
        return {}
