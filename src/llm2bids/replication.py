"""``llm2bids replicate``: the two papers' protocols, run correctly, next to their published defect.

arXiv 2502.20408 ("paper 1") decomposes the MLP *output* (the down projection's output,
hidden-size dimensions) with ICA over the whole model, takes ``z >= 3.6`` one-sided and the
union over components, and masks with zeros. arXiv 2508.05239 (the pruning paper) runs
CanICA *per layer* on the MLP intermediate, takes ``|z|`` above a high threshold, and keeps
the first 3 and the last 2 layers whole. Both are run here on the same recording, with
llm2bids' masking (each hook bound to its own layer) and, clearly labelled, with an
emulation of the published code's masking, whose hooks were lambdas created in a loop: every
hook read the loop variable when it ran, after the loop had ended, so every layer received
the last layer's mask (fixed upstream in July 2025, after publication).

The emulation (:func:`published_masking`) lives here, outside the library's masking API
(:mod:`llm2bids.evaluation.masking`), and exists only to show where the published numbers
come from.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._docs import fill_doc
from .bids import find_runs
from .bids.names import acquisition_label
from .bids.path import BIDSPath
from .decomposition import FunctionalNetworks
from .derivatives import init_derivatives, provenance, write_table
from .evaluation import minimal_pairs, rank_neurons, top_neurons
from .evaluation.lesion import BASELINE, evaluate, lesion_study
from .evaluation.masking import check_mask, mask_neurons, resolve_layers
from .exceptions import InputError
from .models import LoadedModel, arch_spec, load_model
from .models.hooks import layer_count, neurons_per_layer
from .recording import record
from .report import build_report
from .stimuli import heldout_text

logger = logging.getLogger("llm2bids.replication")

#: Analysis stimuli (the calibration text of mean filling is drawn from the same prose);
#: the evaluation text is the built-in held-out text, which no analysis reads.
TASKS = ("narrative", "expository", "code", "arithmetic")
#: Perplexity windows of the replication: non-overlapping 512-token windows over the whole
#: held-out text (every token scored once, with 256 tokens of context on average).
WINDOW = 512


@dataclass(frozen=True)
class Protocol:
    """One paper's analysis and masking protocol.

    Parameters
    ----------
    name : str
        Label in the tables and file names.
    reference : str
        The paper.
    hook_point : {"mlp", "mlp_out"}
        Units analysed and masked.
    scope : {"model", "layer"}
        One decomposition over all layers, or one per layer.
    n_components : int or tuple of int
        Components per decomposition (a tuple sweeps and takes the union).
    threshold : float
    sided : {"one", "two"}
    protected_layers : tuple of int
        Layers left whole (negative: from the end).
    modes : tuple of str
        Masking modes the paper reports (``keep`` and / or ``ablate``).
    standardize : bool
        z-score each unit's time course first (see
        :class:`~llm2bids.decomposition.FunctionalNetworks`).
    n_init : int, default=1
        ICA runs per decomposition (each paper ran one; nilearn's default of 10 restarts
        costs ten times as much).
    """

    name: str
    reference: str
    hook_point: str
    scope: str
    n_components: int | tuple[int, ...]
    threshold: float
    sided: str
    protected_layers: tuple[int, ...]
    modes: tuple[str, ...]
    standardize: bool
    n_init: int = 1

    def estimator(self, seed: int) -> FunctionalNetworks:
        """The decomposition of this protocol (nilearn's CanICA with FastICA, as both papers)."""
        return FunctionalNetworks(
            method="canica",
            ica_solver="fastica",
            n_components=self.n_components,
            threshold=self.threshold,
            sided=self.sided,
            scope=self.scope,
            random_state=seed,
            n_init=self.n_init,
            standardize=self.standardize,
        )


PROTOCOLS = (
    Protocol(
        name="paper1",
        reference="arXiv 2502.20408 (MLP output on its raw scale, whole-model ICA, z >= 3.6 "
        "one-sided, union over 64 components, zero fill)",
        hook_point="mlp_out",
        scope="model",
        n_components=64,
        threshold=3.6,
        sided="one",
        protected_layers=(),
        modes=("keep", "ablate"),
        standardize=False,  # FastICA on the raw activations, as published
    ),
    Protocol(
        name="pruning",
        reference="arXiv 2508.05239 (MLP intermediate, per-layer CanICA with 64 components, "
        "|z| >= 6.03, first 3 and last 2 layers whole, zero fill)",
        hook_point="mlp",
        scope="layer",
        n_components=64,
        threshold=6.03,
        sided="two",
        protected_layers=(0, 1, 2, -2, -1),
        modes=("keep",),
        standardize=True,  # the published CanICA z-scores every signal first
    ),
)


@contextlib.contextmanager
def published_masking(
    model: torch.nn.Module | LoadedModel,
    neurons: np.ndarray,
    mode: str = "ablate",
    means: np.ndarray | None = None,
    hook_point: str = "mlp_out",
) -> Iterator[None]:
    """EMULATION of the published code's defective masking: every layer gets the last layer's mask.

    Not llm2bids' masking (that is :func:`~llm2bids.evaluation.mask_neurons`, which binds each
    hook to its own layer). This reproduces, on purpose, the hook registration of the
    authors' ``llmfact/mask.py`` before July 2025: a ``lambda`` created in a loop over layers
    that reads the loop variable ``i`` only when it runs, by which time the loop has ended
    and ``i`` is the last layer's index.

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
    neurons : ndarray of bool, shape (n_layers, n_units)
        The set (as for :func:`~llm2bids.evaluation.mask_neurons`).
    mode : {"ablate", "keep"}, default="ablate"
    means : None
        The published code fills with zeros only; anything else is refused.
    hook_point : {"mlp_out", "mlp"}, default="mlp_out"
        ``"mlp_out"`` masks the down projection's output, as the published code does;
        ``"mlp"`` its input.
    """
    if means is not None:
        raise InputError("the published masking fills with zeros only; pass means=None.")
    model = model.model if isinstance(model, LoadedModel) else model
    masked = torch.as_tensor(check_mask(model, neurons, mode, hook_point))  # True: masked
    spec = arch_spec(model)
    handles = []
    try:
        for i in range(masked.shape[0]):
            module = spec.down_module(model, i)
            if hook_point == "mlp_out":
                # the defect, as published: ``i`` is looked up when the hook runs
                handles.append(
                    module.register_forward_hook(
                        lambda module, inputs, outputs: _zero_fill(outputs, masked[i : i + 1])  # noqa: B023
                    )
                )
            else:
                handles.append(
                    module.register_forward_pre_hook(
                        lambda module, inputs: (
                            (_zero_fill(inputs[0], masked[i : i + 1]),)  # noqa: B023
                            + tuple(inputs[1:])
                        )
                    )
                )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_fill(x: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask_row.to(x.device).expand_as(x), 0.0)


MASKINGS = {"correct": mask_neurons, "published": published_masking}


def key_set(fit: FunctionalNetworks) -> np.ndarray:
    """The union of a fit's networks as a ``(n_layers, n_units)`` boolean set."""
    geom = fit.geometry_
    member = fit.networks_.any(axis=0)
    labels = geom.labels()
    out = np.zeros((geom.n_layers, geom.n_neurons), dtype=bool)
    out[labels.layer.to_numpy()[member], labels.neuron.to_numpy()[member]] = True
    return out


@fill_doc
def replicate(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    output_dir: str | Path,
    model: str | LoadedModel | None = None,
    *,
    n_controls: int = 5,
    seed: int = 0,
    fractions: Sequence[float] = (0.1, 0.5),
    max_tokens: int = 512,
    device: str = "auto",
    verbose: int = 1,
    protocols: Sequence[Protocol] = PROTOCOLS,
    per_layer_curves: bool = False,
) -> dict[str, Path]:
    """Run both papers' protocols with correct masks and with the published defect emulated.

    Records the model on the built-in analysis tasks (MLP neurons and MLP outputs) into
    ``output_dir/bids``, fits each :data:`PROTOCOLS` decomposition, and evaluates on the
    built-in held-out text (over 5,000 tokens, read by no analysis) and 210 minimal pairs:
    the intact model; each protocol's key set in each of its modes, with llm2bids' masking
    and with :func:`published_masking`, each next to ``n_controls`` random sets of the same
    size in every layer; and keep-only curves of the top ``fractions`` of MLP neurons (ranked
    by the pruning protocol's per-layer maps) over the whole model (and, with
    ``per_layer_curves``, layer by layer).

    Parameters
    ----------
    output_dir : str or Path
        Gets ``bids/`` (the recording) and ``bids/derivatives/llm2bids/`` (the tables:
        ``sub-<label>_replication.tsv``, one row per evaluated condition, and
        ``sub-<label>_desc-summary_replication.tsv``, target versus controls).
    model : str, LoadedModel or None, default=None
        ``None`` is the embedded SmolLM2-135M.
    n_controls : int, default=5
        Random sets per target (at least 5).
    %(seed)s
    fractions : sequence of float, default=(0.1, 0.5)
        Shares of MLP neurons kept in the keep-only curves.
    max_tokens : int, default=512
        Longest recorded run.
    %(device)s
    %(verbose)s
    protocols : sequence of Protocol, default=PROTOCOLS
        The protocols; the keep-only curves rank MLP neurons by the last one whose hook point
        is ``"mlp"``.
    per_layer_curves : bool, default=False
        Also draw the keep-only curves with the top fraction of every layer (each costs as
        much as the global ones: about 8 more minutes on 2 CPU cores).

    Returns
    -------
    dict of str to Path
        ``conditions`` and ``summary`` (the two TSVs), ``report`` (the HTML report with the
        replication section) and ``bids`` (the raw dataset).
    """
    _check_replication(n_controls, fractions, protocols)
    t0 = time.time()
    say = print if verbose else (lambda *a, **k: None)
    bids = Path(output_dir) / "bids"
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    for protocol in protocols:
        resolve_layers(protocol.protected_layers, layer_count(lm.model))
    _record_protocols(lm, bids, protocols, max_tokens, verbose, say)
    deriv = init_derivatives(bids / "derivatives" / "llm2bids", bids)
    study = _Study(lm, n_controls, seed, minimal_pairs(), verbose)
    say("evaluate the intact model")
    rows = [
        pd.DataFrame([BASELINE | evaluate(lm, study.text, study.pairs, WINDOW, WINDOW)]).assign(
            study="baseline", protocol="none", masking="none", hook_point="none"
        )
    ]
    fits = {}
    for protocol in protocols:
        fits[protocol.name], protocol_rows = _protocol_rows(study, protocol, bids, deriv, say)
        rows += protocol_rows
    ranked_by = [p for p in protocols if p.hook_point == "mlp"][-1]
    curve_fit = fits[ranked_by.name]
    ranking = rank_neurons(curve_fit.components_img_, curve_fit.geometry_)
    for per_layer in (False, True) if per_layer_curves else (False,):
        rows += _curve_rows(study, ranking, fractions, per_layer, say)
    table = pd.concat(rows, ignore_index=True)
    first = ["study", "protocol", "masking", "hook_point", "fraction", "condition", "seed"]
    table = table[first + [c for c in table.columns if c not in first]]
    params = provenance(
        model_id=lm.model_id,
        protocols=[asdict(p) for p in protocols],
        curves_ranked_by=ranked_by.name,
        n_controls=n_controls,
        seed=seed,
        fractions=list(fractions),
        tasks=list(TASKS),
        max_tokens=max_tokens,
        evaluation_text=f"built-in held-out text ({int(table.n_tokens.iloc[0])} scored tokens, "
        f"{WINDOW}-token windows)",
        minimal_pairs=f"built-in templated minimal pairs ({len(study.pairs)} distinct items)",
    )
    files = _write_replication(table, params, BIDSPath(subject=lm.label, root=deriv))
    report = build_report(deriv, lm.label)
    say(f"done in {(time.time() - t0) / 60:.1f} min: {files['summary']}, {report}")
    return files | {"report": report, "bids": bids}


def _check_replication(n_controls: int, fractions, protocols) -> None:
    """Refuse parameters a replication cannot use, before anything is loaded."""
    if n_controls < 5:
        raise InputError(
            f"n_controls must be at least 5 for a replication (the issue's bar), got {n_controls}."
        )
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise InputError(f"fractions must lie in (0, 1], got {fraction!r}.")
    if not any(p.hook_point == "mlp" for p in protocols):
        raise InputError("the keep-only curves need a protocol on MLP neurons (hook_point='mlp').")


def _record_protocols(lm, bids: Path, protocols, max_tokens: int, verbose: int, say) -> None:
    """Record the analysis tasks at every hook point a protocol reads."""
    for hook_point in sorted({p.hook_point for p in protocols}):
        say(f"record {lm.model_id} ({hook_point}) on {', '.join(TASKS)} -> {bids}")
        record(
            bids,
            model=lm,
            task=list(TASKS),
            hook_point=hook_point,
            max_tokens=max_tokens,
            batch_size=4,
            verbose=verbose,
        )


@dataclass
class _Study:
    """One lesion study (a target next to its controls) of the replication's model."""

    lm: LoadedModel
    n_controls: int
    seed: int
    pairs: list
    verbose: int
    text: str = field(default_factory=heldout_text)

    def __call__(self, target, mode, masking, hook_point, protected=()) -> pd.DataFrame:
        """The study's rows, with the share of units each condition leaves unmasked."""
        return lesion_study(
            self.lm,
            target,
            mode,
            self.n_controls,
            self.seed,
            text=self.text,
            pairs=self.pairs,
            verbose=self.verbose,
            window=WINDOW,
            stride=WINDOW,
            protected_layers=protected,
            hook_point=hook_point,
            masker=MASKINGS[masking],
            baseline=False,
        ).pipe(_with_unmasked_share, self.lm, hook_point)


def _protocol_rows(study: _Study, protocol: Protocol, bids: Path, deriv: Path, say):
    """Fit one protocol, write its key set, and study it in each mode and masking."""
    lm = study.lm
    say(f"{protocol.name}: {protocol.reference}")
    runs = find_runs(bids, subject=lm.label, hook_point=protocol.hook_point)
    fit = protocol.estimator(study.seed).fit(runs)
    target = key_set(fit)
    base = BIDSPath(
        subject=lm.label,
        acquisition=acquisition_label(protocol.hook_point),
        description=protocol.name,
        root=deriv,
    )
    write_table(
        base.update(suffix="keyneurons", extension=".tsv").fpath,
        fit.key_neurons_,
        provenance(**asdict(protocol), seed=study.seed, model_id=lm.model_id),
    )
    rows = []
    for mode in protocol.modes:
        for masking in MASKINGS:
            say(f"  {mode} the key set ({int(target.sum())} units), {masking} masking")
            rows.append(
                study(target, mode, masking, protocol.hook_point, protocol.protected_layers).assign(
                    study="key set",
                    protocol=protocol.name,
                    masking=masking,
                    hook_point=protocol.hook_point,
                )
            )
    return fit, rows


def _curve_rows(study: _Study, ranking, fractions, per_layer: bool, say) -> list[pd.DataFrame]:
    """Keep-only curves: the top ``fractions`` of MLP neurons (globally or in every layer)."""
    model = study.lm.model
    n_layers, width = layer_count(model), neurons_per_layer(model)[0]
    selection = "per-layer" if per_layer else "global"
    rows = []
    for fraction in fractions:
        target = top_neurons(ranking, fraction, n_layers, width, per_layer=per_layer)
        for masking in MASKINGS:
            say(f"  keep the {selection} top {fraction:.0%} of MLP neurons, {masking} masking")
            rows.append(
                study(target, "keep", masking, "mlp").assign(
                    study=f"keep-only curve ({selection} top-k)",
                    protocol="none",
                    masking=masking,
                    hook_point="mlp",
                    fraction=fraction,
                )
            )
    return rows


def _write_replication(table: pd.DataFrame, params: dict, base: BIDSPath) -> dict[str, Path]:
    """Write the conditions and their summary (target versus controls)."""
    base = base.update(suffix="replication", extension=".tsv")
    conditions = write_table(
        base.fpath,
        table,
        params | {"Description": "One row per evaluated condition of the replication."},
    )
    summary = write_table(
        base.update(description="summary").fpath,
        summarize_replication(table),
        params
        | {
            "Description": "Each target next to its random controls: perplexity and "
            "minimal-pair accuracy (95% Wilson interval over items) of the target, the "
            "controls' median and range, and how many controls have a higher perplexity."
        },
    )
    return {"conditions": conditions, "summary": summary}


def _with_unmasked_share(table: pd.DataFrame, lm, hook_point) -> pd.DataFrame:
    """Add the share of the hook point's units the condition leaves unmasked."""
    total = layer_count(lm.model) * neurons_per_layer(lm.model, hook_point)[0]
    kept = np.where(table["mode"] == "keep", table.n_neurons, total - table.n_neurons)
    return table.assign(fraction_unmasked=np.round(kept / total, 4))


def summarize_replication(table: pd.DataFrame) -> pd.DataFrame:
    """One row per target: its metrics next to its controls' median and range.

    ``controls_above_target`` counts the controls whose perplexity is higher than the
    target's: all of them when the key set matters more than random sets of its size in
    keep mode, none of them when it does in ablate mode.
    """
    baseline = table[table.condition == "baseline"].iloc[0]
    keys = ["study", "protocol", "masking", "mode", "fraction"]
    rows = []
    body = table[table.condition != "baseline"].fillna({"fraction": -1})
    for key, group in body.groupby(keys, sort=False):
        target = group[group.condition == "target"].iloc[0]
        controls = group[group.condition == "control"]
        ppl = controls.perplexity.to_numpy(float)
        rows.append(
            dict(zip(keys, key))
            | {"fraction": "n/a" if key[-1] == -1 else key[-1]}
            | {
                "fraction_unmasked": target.fraction_unmasked,
                "n_controls": len(controls),
                "perplexity_intact": baseline.perplexity,
                "perplexity_target": target.perplexity,
                "perplexity_controls_median": float(np.median(ppl)),
                "perplexity_controls_min": float(ppl.min()),
                "perplexity_controls_max": float(ppl.max()),
                "controls_above_target": int((ppl > target.perplexity).sum()),
                "pairs_intact": baseline.minimal_pair_accuracy,
                "pairs_target": target.minimal_pair_accuracy,
                "pairs_target_ci_low": target.minimal_pair_ci_low,
                "pairs_target_ci_high": target.minimal_pair_ci_high,
                "pairs_controls_mean": float(controls.minimal_pair_accuracy.mean()),
                "n_pairs": int(target.n_pairs),
            }
        )
    return pd.DataFrame(rows)
