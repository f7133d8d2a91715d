"""Synthetic runs with planted neuron groups, written through llm2bids' own BIDS writers."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llm2bids import _io
from llm2bids.bids import dataset
from llm2bids.bids.events import events_frame, write_events
from llm2bids.bids.geometry import VoxelGeometry
from llm2bids.bids.nifti import write_run
from llm2bids.bids.path import BIDSPath
from llm2bids.stimuli import Document, Segment, StimulusSet


def write_synthetic(
    root: Path,
    runs: Iterable[np.ndarray],
    conditions: list[list[str]] | None = None,
    subject: str = "synth",
    task: str = "synth",
    special_first: bool = True,
) -> list[Path]:
    """Write ``runs`` (each ``(T, n_layers, n_neurons)``) as a dataset; return the bold paths.

    ``runs`` may be a generator: each run is written before the next is drawn, so a dataset
    larger than memory can be written (the at-size benchmark does).
    """
    runs = iter(runs)
    first = next(runs)
    n_layers, n_neurons = first.shape[1:]
    geom = VoxelGeometry(n_layers, n_neurons)
    dataset.init_dataset(root)
    dataset.add_participant(
        root,
        {
            "participant_id": f"sub-{subject}",
            "model_id": "synthetic",
            "architecture": "n/a",
            "n_layers": n_layers,
            "mlp_neurons_per_layer": n_neurons,
        },
    )
    recording = BIDSPath(subject=subject, task=task, acquisition="mlp", root=root)
    _io.write_json(
        recording.update(suffix="bold", extension=".json").fpath,
        {"RepetitionTime": 1.0, **geom.to_sidecar()},
    )
    paths = []
    for i, acts in enumerate(itertools.chain([first], runs)):
        t = acts.shape[0]
        conds = conditions[i] if conditions else ["x"] * t
        special = np.zeros(t, dtype=int)
        if special_first:
            special[0] = 1
            conds = ["special", *conds[1:]]
        block = geom.empty_block(t)
        block[:, :, :n_neurons] = acts
        write_events(
            recording.update(run=i + 1, suffix="events", extension=".tsv").fpath,
            events_frame(np.arange(t), [f"tok{j}" for j in range(t)], conds, special),
        )
        bold = recording.update(run=i + 1, suffix="bold", extension=".nii").fpath
        paths.append(write_run(bold, block, geom))
        del acts, block
    docs = [
        Document(f"run{i + 1}", [Segment(f"synthetic run {i + 1}", "x")]) for i in range(len(paths))
    ]
    stimuli = StimulusSet(task, "Synthetic data.", docs, "CC0")
    dataset.register_task(root, task, stimuli.task_metadata(), stimuli.files())
    return paths


def planted_networks(
    n_runs=4,
    n_tokens=300,
    n_layers=4,
    n_neurons=100,
    n_groups=4,
    group_size=20,
    noise=0.5,
    seed=0,
):
    """Runs where ``n_groups`` disjoint neuron groups follow independent sparse time courses.

    Returns the runs and the true groups as boolean masks of shape ``(n_groups, n_layers *
    n_neurons)`` over the flat ``layer * n_neurons + neuron`` index.
    """
    rng = np.random.default_rng(seed)
    flat = rng.permutation(n_layers * n_neurons)[: n_groups * group_size]
    truth = np.zeros((n_groups, n_layers * n_neurons), dtype=bool)
    for k in range(n_groups):
        truth[k, flat[k * group_size : (k + 1) * group_size]] = True
    runs = []
    for _ in range(n_runs):
        sources = rng.laplace(size=(n_tokens, n_groups)) * (rng.random((n_tokens, n_groups)) < 0.3)
        weights = truth * rng.uniform(0.8, 1.2, size=truth.shape)
        data = sources @ weights * 3 + noise * rng.standard_normal((n_tokens, truth.shape[1]))
        data[0] = 100.0  # a BOS-like outlier volume, marked special
        runs.append(data.reshape(n_tokens, n_layers, n_neurons).astype(np.float32))
    return runs, truth
