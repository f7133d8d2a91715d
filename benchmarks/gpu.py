"""GPU section of the benchmarks: recording research-size shapes against references.

Needs no model file: random-weight models of named real shapes are built from configs
(speed does not depend on the values) and fed a real tokenizer's tokens (the tests' byte-level
BPE, trained on the built-in stimuli). On one device and in one run it measures:

- the bare forward pass (the backbone, as recording runs it);
- ``llm2bids.record``;
- a reference pipeline, rebuilt here in ~60 lines: forward pre-hooks copy each layer into one
  device buffer laid out as the NIfTI data block, finiteness checked on the device, one pinned
  device-to-host copy per run, several writer threads writing the header and the raw block;
- the papers' extractor style: batch 1, each layer ``.half().cpu()`` into lists, one
  ``torch.save`` per run;
- plain writes of the same bytes into the same number of files (one thread, several, with and
  without a final sync): the disk's own speeds;
- peak host RSS and peak device memory of ``record``, and masked / unmasked throughput.

``python benchmarks/run.py --only gpu`` runs it on CUDA; ``--gpu-dry-run`` runs the same code
on the CPU with a tiny shape (what the test suite checks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from run import _batch_inputs, _batches, _sync


def _llama(hidden, neurons, layers, heads, kv, vocab, tie):
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=neurons,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=4096,
    )


SHAPES = {
    "SmolLM2-135M": lambda: _llama(576, 1536, 30, 9, 3, 49152, True),
    "Llama-3.2-1B": lambda: _llama(2048, 8192, 16, 32, 8, 128256, True),
    "Llama-3-8B": lambda: _llama(4096, 14336, 32, 32, 8, 128256, False),
    "tiny": lambda: _llama(64, 300, 4, 4, 2, 512, True),  # CPU dry runs
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model of a named shape, wrapped with the tests' tokenizer."""
    from llm2bids.models import wrap_model
    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype)
    return wrap_model(model.eval(), tiny_tokenizer(), f"random-{shape}")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def bare_forward(lm, runs, batch_size) -> float:
    """Seconds of the backbone's forward passes over all runs."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(runs, batch_size):
            ids, mask = _batch_inputs(batch, lm.device)
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    _sync()
    return time.perf_counter() - start


def reference_pipeline(lm, runs, batch_size, folder: Path, writers: int = 4) -> float:
    """The simple reference recorder described in the module docstring; returns seconds."""
    from llm2bids.bids.geometry import VoxelGeometry
    from llm2bids.bids.nifti import header_bytes
    from llm2bids.models.hooks import layer_count, neuron_hooks, neurons_per_layer

    folder.mkdir(parents=True, exist_ok=True)
    n_layers, n = layer_count(lm.model), neurons_per_layer(lm.model)[0]
    geometry = VoxelGeometry(n_layers, n)
    longest = max(len(r) for r in runs)
    cuda = lm.device.type == "cuda"
    buf = torch.zeros(
        batch_size, longest, n_layers, geometry.slice_size, device=lm.device, dtype=torch.float32
    )
    pinned = [torch.empty(buf[0].shape, pin_memory=cuda) for _ in range(batch_size)]
    pool = ThreadPoolExecutor(writers)

    def write(path, data: np.ndarray, head: bytes, event):
        if event is not None:
            event.synchronize()
        with open(path, "wb", buffering=0) as f:
            f.write(head)
            view = memoryview(data).cast("B")
            while len(view):
                view = view[f.write(view) :]

    def hook(layer, x):
        buf[: x.shape[0], : x.shape[1], layer, :n].copy_(x)

    start = time.perf_counter()
    pending = []
    with torch.inference_mode(), neuron_hooks(lm.model, hook):
        for batch in _batches(runs, batch_size):
            ids, mask = _batch_inputs(batch, lm.device)
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            if not bool(torch.isfinite(buf[: len(batch)]).all()):
                raise RuntimeError("non-finite activation")
            for f in pending:  # the pinned buffers are free again
                f.result()
            pending = []
            for i, r in enumerate(batch):
                t = len(r)
                pinned[i][:t].copy_(buf[i, :t], non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                pending.append(
                    pool.submit(
                        write,
                        folder / f"run-{r.index}_bold.nii",
                        pinned[i][:t].numpy(),
                        header_bytes(geometry, t),
                        event,
                    )
                )
        for f in pending:
            f.result()
    pool.shutdown()
    return time.perf_counter() - start


def paper_extractor(lm, runs, folder: Path) -> float:
    """The published extractor's style: batch 1, ``.half().cpu()`` per layer, ``torch.save``."""
    from llm2bids.models.hooks import neuron_hooks

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for r in runs:
        layers: list[torch.Tensor] = []
        with torch.inference_mode(), neuron_hooks(lm.model, lambda _, x, out=layers: out.append(x)):
            ids = torch.as_tensor(r.token_ids, device=lm.device)[None]
            lm.model.base_model(input_ids=ids, use_cache=False)
        torch.save([x.half().cpu() for x in layers], folder / f"run-{r.index}.pt")
    return time.perf_counter() - start


def bench_shape(shape, device, dtype, n_tokens, run_tokens, batch_size, work: Path) -> list:
    """All rows of one shape (see the module docstring); values in tokens/s unless named."""
    from run import _plain_write, _texts

    from llm2bids import record
    from llm2bids.evaluation import mask_neurons
    from llm2bids.models.hooks import layer_count, neurons_per_layer
    from llm2bids.recording.writer import default_writers
    from llm2bids.stimuli import tokenize_runs

    lm = build(shape, device, dtype)
    _sync()
    after_load = _status_mb("VmRSS:")
    stim = _texts(n_tokens, run_tokens, lm.tokenizer)
    runs = tokenize_runs(stim, lm.tokenizer, max_tokens=run_tokens + 8)
    total = sum(len(r) for r in runs)
    bare_forward(lm, runs[:batch_size], batch_size)  # warm-up (kernels, allocator)
    t_forward = bare_forward(lm, runs, batch_size)

    _reset_peak()
    folder = work / "record"
    start = time.perf_counter()
    record(
        folder,
        model=lm,
        stimuli=stim,
        max_tokens=run_tokens + 8,
        batch_size=batch_size,
        verbose=0,
    )
    t_record = time.perf_counter() - start
    peak_host = _status_mb("VmHWM:")
    host_after = _status_mb("VmRSS:")
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    bold = sorted(folder.rglob("*_bold.nii"))
    written = sum(p.stat().st_size for p in bold)
    shutil.rmtree(folder)

    t_reference = reference_pipeline(lm, runs, batch_size, work / "reference")
    shutil.rmtree(work / "reference")
    t_paper = paper_extractor(lm, runs, work / "paper")
    shutil.rmtree(work / "paper")
    n_files = len(bold)
    same = np.ones(written // n_files, dtype=np.uint8)  # same bytes, same number of files
    plain = {
        (threads, sync): _plain_write(work / "plain", same, n_files, threads, sync)
        for threads in (1, default_writers())
        for sync in (False, True)
    }

    target = np.random.default_rng(0).random(
        (layer_count(lm.model), neurons_per_layer(lm.model)[0])
    )
    ids, _ = _batch_inputs(runs[:batch_size], lm.device)

    def fwd():
        with torch.inference_mode():
            lm.model.base_model(input_ids=ids, use_cache=False)
        _sync()

    fwd()
    t_plain_fwd = min(_timed(fwd) for _ in range(3))
    with mask_neurons(lm.model, target < 0.05):
        fwd()
        t_masked = min(_timed(fwd) for _ in range(3))
    gb = written / 1e9
    return [
        {
            "shape": shape,
            "tokens": total,
            "GB written": gb,
            "forward_tok_s": total / t_forward,
            "record_tok_s": total / t_record,
            "record_GB_s": gb / t_record,
            "reference_tok_s": total / t_reference,
            "paper_style_tok_s": total / t_paper,
            "record_vs_reference": t_reference / t_record,
            "record_vs_forward": t_forward / t_record,
            "plain_1thread_GB_s": gb / plain[(1, False)],
            f"plain_{default_writers()}threads_GB_s": gb / plain[(default_writers(), False)],
            "plain_1thread_synced_GB_s": gb / plain[(1, True)],
            f"plain_{default_writers()}threads_synced_GB_s": gb / plain[(default_writers(), True)],
            "host_after_load_MB": after_load,
            "peak_host_MB": peak_host,
            "host_after_record_MB": host_after,
            "peak_device_MB": peak_device,
            "masked_vs_unmasked": t_plain_fwd / t_masked,
        }
    ]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_gpu(quick: bool, dry_run: bool = False) -> dict | None:
    """The GPU section: every shape in bfloat16, batch 16, runs of 512 tokens."""
    if dry_run:
        device, dtype, shapes = torch.device("cpu"), torch.float32, ["tiny"]
        n_tokens, run_tokens, batch = 512, 64, 4
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = ["SmolLM2-135M", "Llama-3.2-1B", "Llama-3-8B"]
        n_tokens, run_tokens, batch = (8192 if quick else 16384), 512, 16
    else:
        return None
    work = Path(tempfile.mkdtemp(prefix="llm2bids-gpu-", dir=os.environ.get("LLM2BIDS_WORK")))
    rows = []
    try:
        for shape in shapes:
            rows += bench_shape(shape, device, dtype, n_tokens, run_tokens, batch, work)
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    return {"device": name, "dtype": str(dtype).replace("torch.", ""), "rows": rows}
