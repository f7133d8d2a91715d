"""``record``: present stimuli to a model and write every run as BIDS."""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import _io
from ..bids import dataset as bids_dataset
from ..bids.events import EVENTS_COLUMNS
from ..bids.geometry import VoxelGeometry
from ..bids.names import acquisition_label, check_label, strip_prefix
from ..bids.nifti import run_file_complete
from ..bids.path import BIDSPath, participant_id
from ..bids.reader import find_runs
from ..exceptions import (
    DiskSpaceError,
    InputError,
    ParameterClashError,
    ResourceError,
    check_positive_int,
)
from ..models import LoadedModel, arch_spec, clean_label, load_model, neuron_hooks
from ..models.hooks import (
    HOOK_POINT_DESCRIPTIONS,
    check_hook_point,
    hook_device,
    layer_count,
    neurons_per_layer,
)
from ..models.identity import model_identity
from ..stimuli import (
    BUILTIN_SETS,
    RunStimulus,
    StimulusSet,
    builtin_set,
    read_stimuli,
    tokenize_runs,
)
from .capture import ActivationsModified, CapturedBatch
from .pipeline import MemoryPlan, RecordingPipeline, stages_on
from .resources import available_memory, device_free_memory, write_speed

logger = logging.getLogger("llm2bids.recording")


class _StopForward(Exception):
    """Raised by the last recorded layer's hook: nothing after it is needed."""


def record(  # noqa: PLR0913 (public: keyword options, as the CLI's)
    bids_dir: str | Path,
    model: str | LoadedModel | None = None,
    *,
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
    check_positive_int("batch_size", batch_size)
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
    per_layer = neurons_per_layer(lm.model, hook_point)
    widths = {per_layer[i] for i in layers}
    if len(widths) != 1:
        raise InputError(
            f"the recorded layers have different widths {sorted(widths)}; record them separately "
            "with --layers."
        )
    geometry = VoxelGeometry(len(layers), widths.pop())
    capture_device = hook_device(lm.model, layers, hook_point)
    staged = stages_on(capture_device)
    setup = _Setup(
        bids_dir,
        lm,
        model_identity(lm),
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
    # Everything is planned and checked before anything is written: a refused recording
    # leaves the dataset as it was (participants.tsv included).
    participant = _participant_row(lm, sub)
    _check_subject(setup, participant, [s.task for s in stimulus_sets])
    tasks = []
    for stimset in stimulus_sets:
        runs = tokenize_runs(stimset, lm.tokenizer, max_tokens, prepend_bos)
        tasks.append(_plan_task(setup, stimset, runs, _plan_batches(runs, batch_size, staged)))
    plan = MemoryPlan.of(geometry, capture_device, staged, [b for t in tasks for b in t.batches])
    _check_memory(plan)
    todo = [r for t in tasks for r in t.todo]
    need = _check_disk(bids_dir, todo, geometry)

    _write_subject(setup, participant)
    if todo:
        _announce(bids_dir, need, len(todo), plan)
    written: list[Path] = []
    pipeline = RecordingPipeline(plan, layers, lm.tokenizer)
    try:
        for planned in tasks:
            written += _record_task(setup, planned, pipeline)
    except BaseException as err:
        pipeline.close(failed=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_filled(setup, tasks, err) from err
        raise
    pipeline.close()
    return written


def _write_subject(setup: _Setup, participant: dict) -> None:
    """Create the dataset if needed and enter the subject (and session) in it.

    Leftovers of an interrupted write are removed from this subject's folder only.
    """
    root, sub, ses = setup.root, setup.sub, setup.ses
    bids_dataset.init_dataset(root)
    _io.remove_stale_temporaries(BIDSPath(subject=sub, session=ses, root=root).directory)
    if ses is None or participant_id(sub) not in set(
        bids_dataset.read_participants(root).participant_id
    ):
        bids_dataset.add_participant(root, participant)
    if ses is not None:
        bids_dataset.add_session(root, sub, _session_row(setup.lm, ses))


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


def _session_row(lm: LoadedModel, ses: str) -> dict:
    return {"session_id": f"ses-{ses}", "model_spec": lm.spec, "revision": lm.revision}


def _check_subject(setup: _Setup, participant: dict, tasks: list[str]) -> None:
    """Refuse to record into a subject (or session) that holds another model (or revision).

    A subject is one model: its ``participants.tsv`` row must name the same model, layers and
    neurons, and (without sessions) the same weights; a session is one revision. With
    ``overwrite``, another model may replace a subject only if every recording it holds is one
    this call replaces, so no run on disk is left contradicting the row.
    """
    root, sub, ses = setup.root, setup.sub, setup.ses
    columns = bids_dataset.MODEL_COLUMNS + (() if ses else bids_dataset.WEIGHTS_COLUMNS)
    where = participant_id(sub)
    conflicts = bids_dataset.row_conflicts(
        bids_dataset.read_participants(root), participant, columns
    )
    if ses is not None and not conflicts:
        where = f"{participant_id(sub)} ses-{ses}"
        conflicts = bids_dataset.row_conflicts(
            bids_dataset.read_sessions(root, sub),
            _session_row(setup.lm, ses),
            bids_dataset.WEIGHTS_COLUMNS,
        )
    if not conflicts:
        return
    others = sorted(
        {
            BIDSPath.from_path(p).task
            for p in find_runs(root, subject=sub, session=ses, hook_point=None)
        }
        - set(tasks)
    )
    if setup.overwrite and not others:
        return
    hint = (
        f"--overwrite replaces only the tasks recorded now, and {where} also holds "
        f"{others} of the recorded model; "
        if setup.overwrite
        else ""
    )
    raise ParameterClashError(
        f"{where} in {root} was recorded from another model than {setup.lm.model_id!r} "
        f"({'; '.join(conflicts)}). A subject is one model: {hint}record this one as another "
        "subject (--subject LABEL), or a revision of the same model as a session (--session "
        "LABEL). Nothing was written."
    )


@dataclass(frozen=True)
class _Setup:
    """What stays fixed across the tasks of one ``record`` call."""

    root: Path
    lm: LoadedModel
    identity: dict
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


@dataclass
class _Task:
    """One task of a ``record`` call, planned and checked before anything is written."""

    stimset: StimulusSet
    runs: list[RunStimulus]
    batches: list[list[RunStimulus]]
    recording: BIDSPath
    params: dict
    resume: bool
    paths: dict[int, tuple[Path, Path]]
    done: set[int]

    @property
    def todo(self) -> list[RunStimulus]:
        """The runs still to record."""
        return [r for r in self.runs if r.index not in self.done]


def _plan_task(setup: _Setup, stimset: StimulusSet, runs: list[RunStimulus], batches) -> _Task:
    """Check a task against what the dataset holds (raising before anything is written)."""
    lm = setup.lm
    bids_dataset.check_task(setup.root, stimset.task, stimset.fingerprint(), setup.overwrite)
    recording = BIDSPath(
        subject=setup.sub,
        session=setup.ses,
        task=stimset.task,
        acquisition=acquisition_label(setup.hook_point),
        root=setup.root,
    )
    sidecar = recording.update(suffix="bold", extension=".json").fpath
    params = {
        "model_spec": lm.spec,
        "revision": lm.revision,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "hook_point": setup.hook_point,
        "layers": setup.layers,
        "max_tokens": int(setup.max_tokens),
        "prepend_bos": bool(setup.prepend_bos),
        "stimuli_sha256": stimset.fingerprint(),
        "n_runs": len(runs),
        # the events' columns: a recording resumed by a version that writes others would mix
        # two formats of events files
        "events_columns": list(EVENTS_COLUMNS),
    }
    resume = bids_dataset.check_recording_params(sidecar, params, setup.overwrite)
    ext = ".nii.gz" if setup.compress else ".nii"
    paths = {
        r.index: (
            recording.update(run=r.index, suffix="bold", extension=ext).fpath,
            recording.update(run=r.index, suffix="events", extension=".tsv").fpath,
        )
        for r in runs
    }
    done = set()
    if resume:  # a run cut short by a crash is recorded again
        done = {
            r.index
            for r in runs
            if paths[r.index][1].exists()
            and run_file_complete(paths[r.index][0], setup.geometry, len(r))
        }
    return _Task(stimset, runs, batches, recording, params, resume, paths, done)


def _record_task(setup: _Setup, task: _Task, pipeline: RecordingPipeline) -> list[Path]:
    root, lm, stimset = setup.root, setup.lm, task.stimset
    bids_dataset.register_task(
        root, stimset.task, stimset.task_metadata(), stimset.files(), overwrite=setup.overwrite
    )
    if not task.resume:
        _remove_runs(task.recording)
    sidecar = task.recording.update(suffix="bold", extension=".json").fpath
    meta = _sidecar(lm, setup.identity, setup.geometry, setup.layers, setup.hook_point, task.params)
    _io.write_json(sidecar, meta)
    if task.done and setup.verbose:
        logger.info(
            "task %s: %d of %d runs already recorded; resuming",
            stimset.task,
            len(task.done),
            len(task.runs),
        )
    todo = task.todo
    if not todo:
        return [task.paths[r.index][0] for r in task.runs]
    pipeline.add_tokens(todo)
    bar = tqdm(
        total=sum(len(r) for r in todo),
        unit="tok",
        disable=not setup.verbose,
        desc=f"sub-{setup.sub} task-{stimset.task}",
    )
    with bar:
        for batch in task.batches:
            rows = [i for i, r in enumerate(batch) if r.index not in task.done]
            if not rows:
                continue
            captured = _forward(lm, batch, pipeline, setup.layers, setup.hook_point)
            pipeline.write(captured, batch, rows, task.paths)
            bar.update(sum(len(batch[i]) for i in rows))
    return [task.paths[r.index][0] for r in task.runs]


def _plan_batches(
    runs: list[RunStimulus], batch_size: int, staged: bool = False
) -> list[list[RunStimulus]]:
    """Batches of ``batch_size`` runs, longest first; on the CPU the last one tapered.

    The plan depends on the full run list (and where the layers run) only, so a resumed
    recording computes every run in the same batch, with the same padding, as an uninterrupted
    one would. On the CPU, the last batch's write has no forward pass left to overlap with;
    halving it until one run remains (4 -> 2, 1, 1) leaves one run's write, not a batch's, at
    the end of the pipeline. A recording of a single batch is not tapered: the peak memory is
    that of one full batch whatever the number of runs, so a short pilot recording shows what
    a long one will need. Staged on an accelerator the forward pass is the fast side: tapering
    would only leave the last runs to fewer writers, so batches stay full.
    """
    order = sorted(runs, key=lambda r: -len(r))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) == 1 or staged:
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
    pipeline: RecordingPipeline,
    layers: list[int],
    hook_point: str,
) -> CapturedBatch:
    """One batched forward pass, captured by the pipeline's capture."""
    device = lm.device
    longest = max(len(r) for r in batch)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, : len(r)] = torch.from_numpy(r.token_ids)
        mask[i, : len(r)] = 1
    capture = pipeline.capture
    capture.start(pipeline.slot, len(batch), longest)
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
        return _forward(lm, batch, pipeline, layers, hook_point)


def _check_memory(plan: MemoryPlan) -> None:
    """Refuse a recording whose buffers do not fit in host (or device) memory."""
    advice = (
        "record with a smaller --batch-size, shorter runs (--max-tokens) or fewer layers "
        "(--layers)."
    )
    available = available_memory()
    what = (
        f"{plan.ring_buffers} run buffers"
        if plan.staged
        else f"{plan.slots} batch{'es' if plan.slots > 1 else ''}"
    )
    if available is not None and plan.host_bytes > 0.9 * available:
        raise ResourceError(
            f"recording holds {what} of activations in host memory, "
            f"{plan.host_bytes / 1e9:.2f} GB, but only {available / 1e9:.2f} GB is available; "
            f"{advice}"
        )
    free = device_free_memory(plan.device)
    if free is not None and plan.device_bytes > 0.9 * free:
        raise ResourceError(
            f"one batch of activations ({plan.device_bytes / 1e9:.2f} GB, staged on "
            f"{plan.device}) does not fit in its free memory ({free / 1e9:.2f} GB); {advice}"
        )


def _check_disk(root: Path, todo: list[RunStimulus], geometry: VoxelGeometry) -> int:
    """Refuse what the disk cannot hold (before anything is written); return the bytes needed."""
    need = sum(len(r) for r in todo) * geometry.volume_size * 4
    free = shutil.disk_usage(_existing_parent(root)).free
    if need * 1.05 + 50e6 > free:
        raise DiskSpaceError(
            f"recording needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at "
            f"{root}; free some space, record fewer layers (--layers) or shorter runs."
        )
    return need


def _disk_filled(setup: _Setup, tasks: list[_Task], err: OSError) -> DiskSpaceError:
    """The error of a disk that filled during the recording: what is kept, what is needed."""
    runs = [(t.paths[r.index], len(r)) for t in tasks for r in t.runs]
    left = [n for (bold, events), n in runs if not (bold.exists() and events.exists())]
    need = sum(left) * setup.geometry.volume_size * 4
    return DiskSpaceError(
        f"the disk filled while writing {err.filename or setup.root} ({err.strerror}): the "
        f"{len(runs) - len(left)} runs finished before are kept and complete; the other "
        f"{len(left)} need about {_size_text(need)} more. Free that space (or record fewer "
        "layers with --layers) and run the same command again: it resumes where it stopped."
    )


def _size_text(n_bytes: int) -> str:
    """``"1.23 GB"`` / ``"4.5 MB"``: a size as a person reads it."""
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.3g} MB"


def _announce(root: Path, need: int, n_runs: int, plan: MemoryPlan) -> None:
    """Log what is about to be written and, for large recordings, how long it will take."""
    logger.info(
        "about to write %.2f GB (%d runs; %.0f MB of activations in host memory); "
        "%.1f GB free on disk",
        need / 1e9,
        n_runs,
        plan.host_bytes / 1e6,
        shutil.disk_usage(root).free / 1e9,
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


def _existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the dataset may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _remove_runs(recording: BIDSPath) -> None:
    """Remove every run file (bold, events) of a recording."""
    for found in recording.match():
        if found.run is not None:
            found.fpath.unlink()


def _sidecar(
    lm: LoadedModel, identity: dict, geometry: VoxelGeometry, layers, hook_point, params
) -> dict:
    return {
        "RepetitionTime": bids_dataset.REPETITION_TIME,
        "Manufacturer": "n/a (language model)",
        **identity,
        "ModelRevision": lm.revision,
        "ModelSource": lm.source,
        "ArchitectureLayout": (
            "discovered from the model's structure (not registered)"
            if arch_spec(lm.model).discovered
            else "registered"
        ),
        "HookPoint": hook_point,
        "HookPointDescription": HOOK_POINT_DESCRIPTIONS[hook_point],
        "RecordedLayers": layers,
        "DataDtype": "float32",
        **geometry.to_sidecar(),
        "RecordingParameters": params,
        "GeneratedBy": bids_dataset.generated_by(),
    }
