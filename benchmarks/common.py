"""Helpers shared by the benchmarks; importable with torch, transformers, numpy and nibabel
alone (the standalone GPU benchmark runs on a box without nilearn, pybids or gguf)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny.py: the tests' tokenizer


def sync() -> None:
    """Wait for the GPU (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batches(runs, batch_size):
    """Consecutive batches of ``batch_size`` runs."""
    return [runs[i : i + batch_size] for i in range(0, len(runs), batch_size)]


def batch_inputs(batch, device):
    """Right-padded ``input_ids`` and ``attention_mask`` of a batch of runs, on ``device``."""
    longest = max(len(r) for r in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, : len(r)] = torch.from_numpy(r.token_ids)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def timed(fn) -> float:
    """Seconds ``fn()`` takes, the GPU waited for on both sides."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    return float(np.median([timed(fn) for _ in range(repeats)]))


def texts(n_tokens, run_tokens, tokenizer):
    """A stimulus set of ``n_tokens`` in runs of ``run_tokens`` (built-in prose, repeated)."""
    from llm2bids.stimuli import Document, Segment, StimulusSet, heldout_text

    base = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    n_runs = max(1, n_tokens // run_tokens)
    docs = []
    for i in range(n_runs):
        ids = [base[(i * 7 + j) % len(base)] for j in range(run_tokens - 1)]
        docs.append(Document(f"d{i}", [Segment(tokenizer.decode(ids), "text")]))
    return StimulusSet(f"bench{n_tokens}", "benchmark", docs, "CC0")


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS:``, ``VmHWM:``) in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (and torch's peak device memory)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def plain_write(
    folder: Path, sizes: list[int], threads: int, sync_files: bool = False, check: bool = False
) -> float:
    """Write files of ``sizes`` bytes with ``threads`` threads; return the seconds taken.

    The disk's own speed for the same bytes in the same number of files as a recording; with
    ``check``, each thread also checks its file's values finite first, as ``record``'s writers
    must (reading them once more).
    """
    from llm2bids.bids.nifti import _write_all
    from llm2bids.recording.writer import _finite

    folder.mkdir(parents=True, exist_ok=True)
    values = np.ones(max(sizes) // 4 + 1, dtype=np.float32)
    data = memoryview(values).cast("B")
    os.sync()  # start from a clean page cache, as every measurement does

    def one(i):
        if check and not _finite([values[: sizes[i] // 4]]):
            raise AssertionError("ones are finite")
        with open(folder / f"plain{i}.bin", "wb", buffering=0) as f:
            _write_all(f, data[: sizes[i]])
            if sync_files:
                os.fsync(f.fileno())

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(sizes))))
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return seconds


def buffer_setup(lm, stim, max_tokens, batch_size, staged=False) -> tuple[float, int]:
    """Seconds to allocate (and, staged, fault in) the memory ``record`` would hold for
    ``stim``, as it does it; and its bytes.

    Parameters
    ----------
    lm : LoadedModel
    stim : StimulusSet
    max_tokens, batch_size : int
        As given to ``record``.
    staged : bool, default=False
        Plan the accelerator's path (stage and ring of run buffers) instead of the CPU's.
    """
    from llm2bids.bids.geometry import VoxelGeometry
    from llm2bids.models.hooks import layer_count, neurons_per_layer
    from llm2bids.recording.pipeline import MemoryPlan, RecordingPipeline
    from llm2bids.recording.recorder import _plan_batches
    from llm2bids.stimuli import tokenize_runs

    runs = tokenize_runs(stim, lm.tokenizer, max_tokens)
    geometry = VoxelGeometry(layer_count(lm.model), neurons_per_layer(lm.model)[0])
    plan = MemoryPlan.of(
        geometry, torch.device("cpu"), staged, _plan_batches(runs, batch_size, staged)
    )
    start = time.perf_counter()
    pipeline = RecordingPipeline(plan, list(range(geometry.n_layers)), lm.tokenizer)
    pipeline.allocate(wait=True)
    seconds = time.perf_counter() - start
    pipeline.close()
    return seconds, plan.host_bytes + plan.device_bytes


def recorded_sizes(folder: Path) -> list[int]:
    """Sizes of the bold files a recording wrote."""
    return [p.stat().st_size for p in sorted(Path(folder).rglob("*_bold.nii"))]


# -- ready activations: record()'s whole host side without a model --------------------------
READY_TYPE = "llm2bids-ready"


class _ReadyDown(torch.nn.Module):
    """Stands where a down projection would: its input is the layer's neurons."""

    def __init__(self, n_neurons: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, n_neurons), requires_grad=False)

    def forward(self, x):
        return x[..., :1]


class ReadyActivations(torch.nn.Module):
    """A "model" whose forward pass hands ready per-layer tensors to the hooks, at no cost.

    ``record()`` runs on it as on a language model (tokenizing, planning, sidecars, events,
    the capture and the writers), so timing ``record()`` on it from entry to return measures
    the host side of recording: what limits a recording when the forward pass is fast.

    Parameters
    ----------
    n_layers, n_neurons : int
        The geometry (16 x 8192 is Llama-3.2-1B).
    batch_size, max_tokens : int
        The largest batch the tensors must cover.
    device : str, default="cpu"
    """

    def __init__(self, n_layers, n_neurons, batch_size, max_tokens, device="cpu"):
        super().__init__()
        from transformers import PretrainedConfig

        from llm2bids.models import ArchSpec, register_architecture

        register_architecture(
            READY_TYPE, ArchSpec(layers="model.layers", mlp="mlp", down="down_proj", up=())
        )
        self.config = PretrainedConfig(num_hidden_layers=n_layers, hidden_size=1)
        self.config.model_type = READY_TYPE
        blocks = torch.nn.ModuleList()
        for _ in range(n_layers):
            block = torch.nn.Module()
            block.mlp = torch.nn.Module()
            block.mlp.down_proj = _ReadyDown(n_neurons)
            blocks.append(block)
        self.model = torch.nn.Module()
        self.model.layers = blocks
        gen = torch.Generator(device=device).manual_seed(0)
        # flat, so that every (batch, tokens) view is contiguous, as a model's activations are
        self.ready = [
            torch.randn(batch_size * max_tokens * n_neurons, generator=gen, device=device)
            for _ in range(n_layers)
        ]
        self.n_neurons = n_neurons
        self.to(device)

    @property
    def base_model(self):
        return self

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        for layer, block in enumerate(self.model.layers):
            block.mlp.down_proj(self.ready[layer][: b * t * self.n_neurons].view(b, t, -1))

    def activations(self, layer: int, batch: int, tokens: int) -> torch.Tensor:
        """What layer ``layer`` hands over for a batch of that shape."""
        return self.ready[layer][: batch * tokens * self.n_neurons].view(batch, tokens, -1)


def ready_model(n_layers, n_neurons, batch_size, max_tokens, device="cpu"):
    """:class:`ReadyActivations` wrapped with the tests' tokenizer, as ``record`` takes it."""
    from llm2bids.models import wrap_model
    from tiny import tiny_tokenizer

    model = ReadyActivations(n_layers, n_neurons, batch_size, max_tokens, device)
    return wrap_model(model, tiny_tokenizer(), f"ready-{n_layers}x{n_neurons}")
