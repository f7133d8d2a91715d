"""The accelerator path of recording, run on the CPU: a stage on the "device", a ring of run
buffers, per-run copies, writers that free buffers one by one.

``stages_on`` is told that the CPU is an accelerator, and the stage is filled with NaN when it
is allocated, as uninitialised device memory may be: every file must still be byte-identical
to the CPU path's, with the same batches.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import llm2bids
from llm2bids.bids import find_runs
from llm2bids.exceptions import NumericalError
from llm2bids.models import arch_spec, load_model
from llm2bids.recording import buffers, pipeline, recorder
from tiny import poisoned


def _stage_on_cpu(monkeypatch) -> list:
    """Record through the staging path on the CPU, with the CPU path's (tapered) batches;
    returns the list the rings made from now on are appended to."""
    plan_batches = recorder._plan_batches
    allocate = buffers._allocate_stage
    monkeypatch.setattr(recorder, "stages_on", lambda device: True)
    monkeypatch.setattr(
        recorder, "_plan_batches", lambda runs, size, staged=False: plan_batches(runs, size)
    )
    monkeypatch.setattr(
        buffers, "_allocate_stage", lambda shape, device: allocate(shape, device).fill_(np.nan)
    )
    rings = []
    ring_class = pipeline.RunRing

    def tracked(*args, **kwargs):
        rings.append(ring_class(*args, **kwargs))
        return rings[-1]

    monkeypatch.setattr(pipeline, "RunRing", tracked)
    return rings


@pytest.fixture
def staged(monkeypatch):
    """Every recording of the test takes the staging path; the rings it made."""
    return _stage_on_cpu(monkeypatch)


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".nii", ".tsv")
    }


CASES = {
    # name: record() arguments (tiny llama: 3 layers x 40 neurons, a padded 7 x 6 grid)
    "tapered batches": dict(task="narrative", max_tokens=24, batch_size=4),
    "batch size 1": dict(task="langloc", max_tokens=32, batch_size=1),
    "layer subset": dict(task="narrative", max_tokens=40, batch_size=3, layers=[0, 2]),
    "mlp_out": dict(task="langloc", max_tokens=32, batch_size=2, hook_point="mlp_out"),
    "resid": dict(task="narrative", max_tokens=32, batch_size=4, hook_point="resid"),
    "several tasks": dict(task=["narrative", "langloc"], max_tokens=48, batch_size=3),
}


@pytest.mark.parametrize("case", CASES)
def test_staged_files_equal_the_cpu_path(tmp_path, tiny_dir, monkeypatch, case):
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    kwargs = dict(model=lm, verbose=0, **CASES[case])
    llm2bids.record(tmp_path / "cpu", **kwargs)
    _stage_on_cpu(monkeypatch)
    written = llm2bids.record(tmp_path / "staged", **kwargs)
    assert written and _files(tmp_path / "staged") == _files(tmp_path / "cpu")
    runs = [
        name for name in _files(tmp_path / "cpu") if name.endswith(("_bold.nii", "_events.tsv"))
    ]
    assert len(runs) == 2 * len(written)


def test_staged_ring_never_exceeds_its_buffers_and_is_unmapped(tmp_path, tiny_dir, staged):
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    llm2bids.record(tmp_path / "bids", model=lm, task="narrative", max_tokens=16, batch_size=4)
    (ring,) = staged
    runs = len(find_runs(tmp_path / "bids"))
    assert runs > ring.n_buffers >= 4  # fewer buffers than runs: buffers were reused
    assert ring._regions == [] and ring._arrays == [None] * ring.n_buffers
    assert ring.pinned_bytes == 0


def test_one_batch_recording_holds_no_more_buffers_than_runs(tmp_path, tiny_dir, staged):
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    text = tmp_path / "two.txt"
    text.write_text("A short text.\n\nAnother short text.\n")
    llm2bids.record(tmp_path / "bids", model=lm, task="two", stimuli=text, batch_size=4)
    (ring,) = staged
    assert ring.n_buffers == len(find_runs(tmp_path / "bids")) <= 2


def test_staged_nan_is_located_and_nothing_of_the_run_is_left(tmp_path, tiny_dir, staged):
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    with (
        poisoned(lm, 1, float("inf")),
        pytest.raises(NumericalError, match="layer 1, token 3"),
    ):
        llm2bids.record(tmp_path / "bids", model=lm, task="narrative", max_tokens=48, batch_size=1)
    assert find_runs(tmp_path / "bids") == []
    assert not list((tmp_path / "bids").rglob("*_events.tsv"))
    assert staged[0]._regions == []  # unmapped on the error path too


def test_staged_writer_error_is_raised_without_deadlock(tmp_path, tiny_dir, staged, monkeypatch):
    from llm2bids.bids import nifti

    calls = []

    def broken(f, data):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti, "_write_all", broken)
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    with pytest.raises(OSError, match="No space"):
        # more runs than ring buffers: the recording blocks on the ring while writers fail
        llm2bids.record(tmp_path / "bids", model=lm, task="narrative", max_tokens=16, batch_size=4)
    assert calls and find_runs(tmp_path / "bids") == []
    assert staged[0]._regions == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_host_memory_is_resident_and_unmapped(tmp_path):
    region = buffers.host_memory(8 << 20)
    assert len(region) == 8 << 20
    view = np.frombuffer(region, dtype=np.float32)
    assert not view.any()  # zeroed
    with pytest.raises(BufferError):  # a live view keeps the mapping
        region.close()
    del view
    region.close()


def test_capture_device_is_where_the_recorded_layers_run():
    """A device map whose first module is on "cpu" or "disk": the layers still run on the GPU
    (accelerate moves the weights of cpu/disk modules to the map's first accelerator)."""
    from llm2bids.models.hooks import hook_device
    from tiny import tiny_model

    model = tiny_model("llama")
    assert hook_device(model) == torch.device("cpu")
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": 0}
    assert hook_device(model, [1]) == torch.device("cuda:0")
    model.hf_device_map = {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": 1,
    }
    assert hook_device(model, [0]) == torch.device("cuda:1")  # cpu -> the first accelerator
    assert hook_device(model, [0, 1], "resid") == torch.device("cuda:1")
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": "cpu"}
    assert hook_device(model) == torch.device("cpu")

    class Hook:  # accelerate's AlignDevicesHook says where a module runs: it wins
        execution_device = 0

    arch_spec(model).blocks(model)[2]._hf_hook = Hook()
    assert hook_device(model, [2]) == torch.device("cuda:0")


def test_a_refused_page_lock_clears_the_cuda_error_and_falls_back(monkeypatch, caplog):
    """cudaHostRegister failing leaves CUDA's last error set (the next kernel launch would
    raise it); the ring clears it, warns once, and copies synchronously."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append("register")
            return 2  # cudaErrorMemoryAllocation

        def cudaGetLastError(self):
            calls.append("clear")
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    ring = buffers.RunRing(1, 1000, torch.device("cpu"))
    try:
        assert ring._page_lock(np.zeros(1000, np.float32)) is False
    finally:
        ring.close()
    assert calls == ["register", "clear"]
    assert "synchronous" in caplog.text
