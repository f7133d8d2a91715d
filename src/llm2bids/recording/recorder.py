"""``record``: present stimuli to a model and write every run as BIDS."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _io
from ..bids import dataset as bids_dataset
from ..bids.geometry import VoxelGeometry
from ..bids.names import acquisition_label, check_label, strip_prefix
from ..bids.path import BIDSPath, participant_id
from ..exceptions import DiskSpaceError, InputError, ResourceError
from ..models import LoadedModel, arch_spec, clean_label, load_model, neuron_hooks
from ..models.hooks import (
    HOOK_POINT_DESCRIPTIONS,
    check_hook_point,
    layer_count,
    neurons_per_layer,
)
from ..stimuli import (
    BUILTIN_SETS,
    RunStimulus,
    StimulusSet,
    builtin_set,
    read_stimuli,
    tokenize_runs,
)
from .buffers import SLOTS, ActivationBuffers
from .capture import ActivationsModified, BatchCapture, CapturedBatch
from .resources import available_memory, write_speed
from .writer import BackgroundWriter, RunWriter

logger = logging.getLogger("llm2bids.recording")


class _StopForward(Exception):
    """Raised by the last recorded layer's hook: nothing after it is needed."""


def record(
    bids_dir: str | Path,
    model: str | LoadedModel | None = None,
    task: str | Sequence[str] | None = None,
    stimuli: str | Path | StimulusSet | None = None,
    subject: str | None = None,
    session: str | None = None,
    max_tokens: int = 512,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "float32",
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    hook_point: str = "mlp",
    layers: Sequence[int] | None = None,
    compress: bool = False,
    overwrite: bool = False,
    prepend_bos: bool = True,
    verbose: int = 1,
) -> list[Path]:
    """Record a model's activations over stimuli into a BIDS dataset.

    Parameters
    ----------
    bids_dir : str or Path
        The dataset (created if missing; a second model or task is added to it).
    model : str or LoadedModel or None, default=None
        A hub id, a folder, a ``.gguf`` file, an already loaded model, or ``None`` for the
        embedded SmolLM2-135M-Instruct.
    task : str or list of str or None, default=None
        Built-in stimulus set(s) to record, or the task name of ``stimuli``. With neither
        ``task`` nor ``stimuli``, every built-in set is recorded.
    stimuli : str or Path or StimulusSet or None, default=None
        A text file, a folder of text files, a TSV (``text`` and optional ``condition`` and
        ``run`` columns), or a :class:`~llm2bids.stimuli.StimulusSet`.
    subject : str or None, default=None
        Subject label; default: the model name reduced to ``[a-zA-Z0-9]``.
    session : str or None, default=None
        Optional session label (a checkpoint or revision of the model).
    max_tokens : int, default=512
        Longest run, in tokens; longer documents are split into several runs.
    batch_size : int, default=4
        Runs per forward pass (right-padded; padding is never written).
    device : {"auto", "cpu", "cuda", "mps"}, default="auto"
    dtype : {"float32", "bfloat16", "float16"}, default="float32"
        Model dtype; activations are written as float32 (exact for all three).
    device_map : str or dict or None, default=None
        Passed to ``from_pretrained`` (``"auto"`` spreads a model larger than one GPU over
        several; needs ``accelerate``). Overrides ``device``.
    offload_folder : str or Path or None, default=None
        With ``device_map``: where modules that fit on no device are kept on disk.
    hook_point : {"mlp", "resid"}, default="mlp"
        ``"mlp"``: MLP neurons (input of the down projection). ``"resid"``: residual stream.
    layers : sequence of int or None, default=None
        Record only these layers (z-slice ``i`` holds ``layers[i]``); default all.
    compress : bool, default=False
        Write ``.nii.gz`` instead of ``.nii``. Activations barely compress and gzip is ~50x
        slower than the disk, so the default is uncompressed.
    overwrite : bool, default=False
        Replace a recording made with other parameters (otherwise that is an error; a
        recording with the same parameters is resumed).
    prepend_bos : bool, default=True
        Start every run with the tokenizer's BOS token (marked special in the events).
    verbose : int, default=1
        0: silent; 1: progress bars and a summary.

    Returns
    -------
    list of Path
        The ``_bold`` files of all runs (written now or before).
    """
    check_hook_point(hook_point)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    stimulus_sets = _stimulus_sets(task, stimuli)
    if subject is not None:
        check_label(clean_label(strip_prefix(subject)), "subject")
    if session is not None:
        check_label(strip_prefix(session, "ses-"), "session")
    bids_dir = Path(bids_dir)
    lm = (
        model
        if isinstance(model, LoadedModel)
        else load_model(
            model,
            device=device,
            dtype=dtype,
            device_map=device_map,
            offload_folder=offload_folder,
        )
    )
    sub = clean_label(strip_prefix(subject)) if subject else lm.label
    ses = strip_prefix(session, "ses-") if session else None
    layers = _check_layers(lm, layers)
    widths = {neurons_per_layer(lm.model, hook_point)[i] for i in layers}
    if len(widths) != 1:
        raise InputError(
            f"the recorded layers have different widths {sorted(widths)}; record them separately "
            "with --layers."
        )
    geometry = VoxelGeometry(len(layers), widths.pop())
    tasks = []
    for stimset in stimulus_sets:
        runs = tokenize_runs(stimset, lm.tokenizer, max_tokens, prepend_bos)
        batches = _plan_batches(runs, batch_size)
        _check_memory(_batch_capacity(batches), geometry, lm.device)  # before anything is written
        tasks.append((stimset, runs, batches))

    bids_dataset.init_dataset(bids_dir)
    # this subject's folder only
    _io.remove_stale_temporaries(BIDSPath(subject=sub, session=ses, root=bids_dir).directory)
    bids_dataset.add_participant(bids_dir, _participant_row(lm, sub))
    setup = _Setup(
        bids_dir,
        lm,
        sub,
        ses,
        geometry,
        layers,
        hook_point,
        max_tokens,
        compress,
        overwrite,
        prepend_bos,
        verbose,
    )
    written: list[Path] = []
    for stimset, runs, batches in tasks:
        written += _record_task(setup, stimset, runs, batches)
    return written


def _stimulus_sets(task, stimuli) -> list[StimulusSet]:
    if isinstance(stimuli, StimulusSet):
        return [stimuli]
    if stimuli is not None:
        if not task or not isinstance(task, str):
            raise InputError("--stimuli needs --task to name the task (one name, e.g. 'mytexts').")
        check_label(task, "task")
        return [read_stimuli(stimuli, task)]
    if task is None:
        return [builtin_set(name) for name in BUILTIN_SETS]
    names = [task] if isinstance(task, str) else list(task)
    return [builtin_set(name) for name in names]


def _check_layers(lm: LoadedModel, layers) -> list[int]:
    n = layer_count(lm.model)
    if layers is None:
        return list(range(n))
    layers = sorted({int(i) for i in layers})
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise InputError(f"layers must be indices in [0, {n}) for this model, got {layers}.")
    return layers


def _participant_row(lm: LoadedModel, sub: str) -> dict:
    return {
        "participant_id": participant_id(sub),
        "model_id": lm.model_id,
        "model_spec": lm.spec,
        "revision": lm.revision,
        "source": lm.source,
        "architecture": lm.architecture,
        "n_parameters": lm.n_parameters,
        "n_layers": layer_count(lm.model),
        "mlp_neurons_per_layer": neurons_per_layer(lm.model)[0],
    }


@dataclass(frozen=True)
class _Setup:
    """What stays fixed across the tasks of one ``record`` call."""

    root: Path
    lm: LoadedModel
    sub: str
    ses: str | None
    geometry: VoxelGeometry
    layers: list[int]
    hook_point: str
    max_tokens: int
    compress: bool
    overwrite: bool
    prepend_bos: bool
    verbose: int


def _record_task(
    setup: _Setup, stimset: StimulusSet, runs: list[RunStimulus], batches: list[list[RunStimulus]]
) -> list[Path]:
    root, lm, sub, ses, geometry = setup.root, setup.lm, setup.sub, setup.ses, setup.geometry
    layers, hook_point, max_tokens = setup.layers, setup.hook_point, setup.max_tokens
    compress, overwrite = setup.compress, setup.overwrite
    prepend_bos, verbose = setup.prepend_bos, setup.verbose
    bids_dataset.register_task(
        root, stimset.task, stimset.task_metadata(), stimset.files(), overwrite=overwrite
    )
    recording = BIDSPath(
        subject=sub,
        session=ses,
        task=stimset.task,
        acquisition=acquisition_label(hook_point),
        root=root,
    )
    sidecar = recording.update(suffix="bold", extension=".json").fpath
    params = {
        "model_spec": lm.spec,
        "revision": lm.revision,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "hook_point": hook_point,
        "layers": layers,
        "max_tokens": int(max_tokens),
        "prepend_bos": bool(prepend_bos),
        "stimuli_sha256": stimset.fingerprint(),
        "n_runs": len(runs),
    }
    resume = bids_dataset.check_recording_params(sidecar, params, overwrite)
    ext = ".nii.gz" if compress else ".nii"
    paths = {
        r.index: (
            recording.update(run=r.index, suffix="bold", extension=ext).fpath,
            recording.update(run=r.index, suffix="events", extension=".tsv").fpath,
        )
        for r in runs
    }
    if not resume:
        _remove_runs(recording)
    _io.write_json(sidecar, _sidecar(lm, geometry, layers, hook_point, params))
    done = {i for i, (bold, events) in paths.items() if bold.exists() and events.exists()}
    todo = [r for r in runs if r.index not in done]
    if done and verbose:
        logger.info(
            "task %s: %d of %d runs already recorded; resuming", stimset.task, len(done), len(runs)
        )
    if not todo:
        return [paths[r.index][0] for r in runs]
    capacity = _batch_capacity(batches)
    _check_disk(root, todo, geometry, capacity)

    bar = tqdm(
        total=sum(len(r) for r in todo),
        unit="tok",
        disable=not verbose,
        desc=f"sub-{sub} task-{stimset.task}",
    )
    with ActivationBuffers(capacity, geometry, lm.device) as buffers:
        capture = BatchCapture(buffers, layers)
        run_writer = RunWriter(lm.tokenizer, geometry, layers)
        writer = BackgroundWriter()
        submitted = 0
        try:
            for batch in batches:
                keep = [i for i, r in enumerate(batch) if r.index not in done]
                if not keep:
                    continue
                captured = _forward(lm, batch, capture, submitted % SLOTS, layers, hook_point)
                writer.submit(
                    [
                        run_writer.task(captured, row, batch[row], paths[batch[row].index])
                        for row in keep
                    ]
                )
                submitted += 1
                bar.update(sum(len(batch[i]) for i in keep))
        finally:
            bar.close()
            writer.close()
    return [paths[r.index][0] for r in runs]


def _plan_batches(runs: list[RunStimulus], batch_size: int) -> list[list[RunStimulus]]:
    """Batches of ``batch_size`` runs, longest first; after a full batch, the last one tapered.

    The plan depends on the full run list only, so a resumed recording computes every run in
    the same batch, with the same padding, as an uninterrupted one would. The last batch's
    write has no forward pass left to overlap with; halving it until one run remains
    (4 -> 2, 1, 1) leaves one run's write, not a batch's, at the end of the pipeline. A
    recording of a single batch is not tapered: the peak memory is that of one full batch
    whatever the number of runs, so a short pilot recording shows what a long one will need.
    """
    order = sorted(runs, key=lambda r: -len(r))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) == 1:
        return batches
    last = batches.pop()
    while len(last) > 1:
        half = (len(last) + 1) // 2
        batches.append(last[:half])
        last = last[half:]
    return batches + [last]


def _forward(
    lm: LoadedModel,
    batch: list[RunStimulus],
    capture: BatchCapture,
    slot: int,
    layers: list[int],
    hook_point: str,
) -> CapturedBatch:
    """One batched forward pass, captured into host slot ``slot``."""
    device = lm.device
    longest = max(len(r) for r in batch)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, : len(r)] = torch.from_numpy(r.token_ids)
        mask[i, : len(r)] = 1
    capture.start(slot, len(batch), longest)
    last = max(layers)

    def hook(layer: int, x: torch.Tensor) -> None:
        capture(layer, x)
        if layer == last and stop_early:
            raise _StopForward

    # Skip the layers after the last recorded one, unless accelerate dispatches the model
    # (its hooks must see every module's forward end, to move offloaded weights back).
    stop_early = last < layer_count(lm.model) - 1 and not getattr(lm.model, "hf_device_map", None)
    # no_grad, not inference_mode: the capture checks the version counters of the tensors it
    # keeps, which inference tensors lack
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        neuron_hooks(lm.model, hook, layers, hook_point),
    ):
        try:
            lm.model.base_model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            )
        except _StopForward:
            pass
    try:
        return capture.finish([len(r) for r in batch])
    except ActivationsModified:
        logger.info(
            "the model modifies its activations in place after the %s hook point; "
            "recording with a copy of each layer from now on",
            hook_point,
        )
        capture.copy = True
        return _forward(lm, batch, capture, slot, layers, hook_point)


def _batch_capacity(batches: list[list[RunStimulus]]) -> int:
    """Largest ``runs x tokens`` of a batch: what one batch of activations holds."""
    return max(len(b) * max(len(r) for r in b) for b in batches)


def _check_memory(capacity: int, geometry: VoxelGeometry, device) -> None:
    """Refuse a recording whose batches do not fit in host (or device) memory."""
    batch_bytes = capacity * geometry.volume_size * 4
    advice = (
        "record with a smaller --batch-size, shorter runs (--max-tokens) or fewer layers "
        "(--layers)."
    )
    available = available_memory()
    if available is not None and SLOTS * batch_bytes > 0.9 * available:
        raise ResourceError(
            f"recording holds {SLOTS} batches of activations in host memory, "
            f"{SLOTS * batch_bytes / 1e9:.2f} GB ({batch_bytes / 1e9:.2f} GB each), but only "
            f"{available / 1e9:.2f} GB is available; {advice}"
        )
    device = torch.device(device)
    if device.type == "cuda":
        device_free, _ = torch.cuda.mem_get_info(device)
        if batch_bytes > 0.9 * device_free:
            raise ResourceError(
                f"one batch of activations ({batch_bytes / 1e9:.2f} GB, staged on {device}) "
                f"does not fit in its free memory ({device_free / 1e9:.2f} GB); {advice}"
            )


def _check_disk(root: Path, todo: list[RunStimulus], geometry: VoxelGeometry, capacity) -> None:
    """Plan before writing: refuse what the disk cannot hold; log the size and expected time."""
    per_token = geometry.volume_size * 4
    need = sum(len(r) for r in todo) * per_token
    free = shutil.disk_usage(root).free
    if need * 1.05 + 50e6 > free:
        raise DiskSpaceError(
            f"recording needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at "
            f"{root}; free some space, record fewer layers (--layers) or shorter runs."
        )
    logger.info(
        "about to write %.2f GB (%d runs; %d batches of up to %.0f MB in host memory); "
        "%.1f GB free on disk",
        need / 1e9,
        len(todo),
        SLOTS,
        capacity * per_token / 1e6,
        free / 1e9,
    )
    if need >= PROBE_ABOVE:  # worth 16 MB and a sync to say how long it will take
        speed = write_speed(root)
        logger.info(
            "at this disk's synced write speed (%.2f GB/s) that takes about %.0f s or less "
            "(less while it fits in the page cache)",
            speed / 1e9,
            need / speed,
        )


PROBE_ABOVE = 1e9  # bytes: smaller recordings are not worth a write-speed probe


def _remove_runs(recording: BIDSPath) -> None:
    """Remove every run file (bold, events) of a recording."""
    for found in recording.match():
        if found.run is not None:
            found.fpath.unlink()


def _sidecar(lm: LoadedModel, geometry: VoxelGeometry, layers, hook_point, params) -> dict:
    return {
        "RepetitionTime": bids_dataset.REPETITION_TIME,
        "Manufacturer": "n/a (language model)",
        "ModelID": lm.model_id,
        "ModelRevision": lm.revision,
        "ModelSource": lm.source,
        "Architecture": lm.architecture,
        "ArchitectureLayout": (
            "discovered from the model's structure (not registered)"
            if arch_spec(lm.model).discovered
            else "registered"
        ),
        "HookPoint": hook_point,
        "HookPointDescription": HOOK_POINT_DESCRIPTIONS[hook_point],
        "RecordedLayers": layers,
        "ModelDtype": params["dtype"],
        "DataDtype": "float32",
        **geometry.to_sidecar(),
        "RecordingParameters": params,
        "GeneratedBy": bids_dataset.generated_by(),
    }
