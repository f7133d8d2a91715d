"""The recording pipeline: raw NIfTI writes, memory planning and release, CUDA capture."""

import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import transformers

import llm2bids
from llm2bids.bids import find_runs, load_run
from llm2bids.bids.geometry import VoxelGeometry
from llm2bids.bids.nifti import header_bytes, run_image, write_run, write_run_pieces
from llm2bids.exceptions import ResourceError
from llm2bids.models import wrap_model
from llm2bids.stimuli import builtin_set, tokenize_runs
from tiny import CONFIGS, direct_activations, tiny_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("n_neurons, n_tokens", [(40, 7), (49, 1), (1536, 3)])
def test_raw_run_is_byte_identical_to_nibabel(tmp_path, n_neurons, n_tokens):
    """The fast writer (header bytes + the block itself) writes exactly nibabel's file."""
    geometry = VoxelGeometry(3, n_neurons)
    block = geometry.empty_block(n_tokens)
    rng = np.random.default_rng(0)
    block[:, :, :n_neurons] = rng.standard_normal((n_tokens, 3, n_neurons))
    fast = write_run(tmp_path / "fast_bold.nii", block, geometry)
    reference = tmp_path / "nibabel_bold.nii"
    run_image(block, geometry).to_filename(reference)
    assert fast.read_bytes() == reference.read_bytes()
    # the gather writer of CPU recordings: per-layer arrays, laid out by the writes themselves
    layers = [np.ascontiguousarray(block[:, z, :n_neurons]) for z in range(3)]
    strided = [block[:, z, :n_neurons] for z in range(3)]  # views of the block: not contiguous
    for piece_bytes in (1, 4 * geometry.volume_size + 1, 1 << 23):
        for given in (layers, strided):
            pieces = (buffers for _, _, buffers in geometry.block_pieces(given, piece_bytes))
            gathered = write_run_pieces(tmp_path / "gathered_bold.nii", pieces, geometry, n_tokens)
            assert gathered.read_bytes() == reference.read_bytes()
    # small rows: assembled into a scratch piece of 1, 2 or more tokens, reused piece by piece
    for scratch_tokens in (1, 2, n_tokens + 1):
        scratch = geometry.empty_block(scratch_tokens)
        pieces = (b for _, _, b in geometry.block_pieces(layers, scratch=scratch))
        assembled = write_run_pieces(tmp_path / "assembled_bold.nii", pieces, geometry, n_tokens)
        assert assembled.read_bytes() == reference.read_bytes()
    assert header_bytes(geometry, n_tokens) == reference.read_bytes()[:352]
    np.testing.assert_array_equal(
        geometry.volume_to_tokens(np.asarray(nib.load(fast).dataobj)), block[:, :, :n_neurons]
    )


def test_drop_behind_writes_the_same_bytes_and_starts_writeback_ahead_of_each_drop(
    tmp_path, monkeypatch
):
    """Drop-behind only advises the kernel: the file is the same, every byte's writeback is
    started once, in order, and a chunk is dropped only two chunks after its writeback began."""
    from llm2bids import _writeback

    calls = []

    def sync_file_range(fd, offset, length, flags):
        calls.append(("writeback", offset, length))
        return 0

    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        calls.append(("drop", offset, length))
        real_fadvise(fd, offset, length, advice)

    chunk = 1 << 16
    monkeypatch.setattr(_writeback, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(_writeback, "_sync_file_range", lambda: sync_file_range)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    geometry = VoxelGeometry(3, 1000)
    block = geometry.empty_block(40)
    block[:, :, :1000] = np.random.default_rng(0).standard_normal((40, 3, 1000))
    layers = [np.ascontiguousarray(block[:, z, :1000]) for z in range(3)]
    files = {}
    for drop in (False, True):
        pieces = (b for _, _, b in geometry.block_pieces(layers, piece_bytes=5000))
        path = tmp_path / f"drop{drop}_bold.nii"
        files[drop] = write_run_pieces(path, pieces, geometry, 40, drop_behind=drop).read_bytes()
    assert _writeback.wait_for_advice(timeout=60)  # given by the background thread
    assert files[True] == files[False] and len(files[True]) > 5 * chunk
    started = [(o, n) for what, o, n in calls if what == "writeback"]
    assert started[0][0] == 0 and sum(n for _, n in started) == len(files[True])
    assert all(o + n == o2 for (o, n), (o2, _) in zip(started, started[1:]))  # in order, once
    drops = [(i, o, n) for i, (what, o, n) in enumerate(calls) if what == "drop"]
    for i, offset, length in drops[:-1]:
        begun = sum(n for what, _, n in calls[:i] if what == "writeback")
        assert length == chunk and offset + length <= begun - 2 * chunk
    assert drops[-1][2] == 0  # the rest, once the file is complete
    # the kernel's own calls (Linux) take the advice: drop-behind stays on for the whole file,
    # and the background thread's descriptor is closed once it is done
    monkeypatch.undo()
    monkeypatch.setattr(_writeback, "CHUNK_BYTES", chunk)
    open_fds = len(os.listdir("/proc/self/fd")) if sys.platform.startswith("linux") else 0
    with open(tmp_path / "real.bin", "wb", buffering=0) as f:
        behind = _writeback.DropBehind(f.fileno())
        for _ in range(6):
            behind.wrote(f.write(bytes(chunk)))
        advised = behind._file
        behind.close()
    assert _writeback.wait_for_advice(timeout=60)
    if sys.platform.startswith("linux"):
        assert (behind.started, behind.dropped) == (6 * chunk, 4 * chunk)
        assert not advised.refused
        assert len(os.listdir("/proc/self/fd")) == open_fds
    # a write that fails half way lets go of the file too (no descriptor is left open)

    def failing():
        for _, stop, buffers in geometry.block_pieces(layers, piece_bytes=5000):
            if stop > 30:  # several chunks written and advised
                raise KeyboardInterrupt
            yield buffers

    with pytest.raises(KeyboardInterrupt):
        write_run_pieces(tmp_path / "cut_bold.nii", failing(), geometry, 40, drop_behind=True)
    assert _writeback.wait_for_advice(timeout=60)
    assert not list(tmp_path.glob("*cut_bold*"))
    if sys.platform.startswith("linux"):
        assert len(os.listdir("/proc/self/fd")) == open_fds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (fork, /proc)")
def test_drop_behind_in_a_forked_child_has_its_own_thread(tmp_path, monkeypatch):
    """A child forked after the parent's background thread started gets its own: its advice
    is given and its descriptors closed (the parent's thread does not exist in the child)."""
    from llm2bids import _writeback

    monkeypatch.setattr(_writeback, "CHUNK_BYTES", 1 << 16)

    def write(path):
        with open(path, "wb", buffering=0) as f, _writeback.DropBehind(f.fileno()) as behind:
            for _ in range(6):
                behind.wrote(f.write(bytes(1 << 16)))

    write(tmp_path / "parent.bin")
    assert _writeback.wait_for_advice(timeout=60)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its advice was given and nothing leaked
        try:
            before = len(os.listdir("/proc/self/fd"))
            write(tmp_path / "child.bin")
            ok = _writeback.wait_for_advice(timeout=30)
            os._exit(0 if ok and len(os.listdir("/proc/self/fd")) == before else 1)
        finally:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0


def test_activations_modified_after_the_hook_are_recorded_as_the_hook_saw_them(tmp_path):
    """A model that changes its hooked tensor in place later in the forward pass.

    The CPU capture keeps the model's own tensors; it must notice the change (version
    counters) and compute the batch again with copies, not write the changed values.
    """
    from llm2bids.models import arch_spec

    lm = _wide_llama()
    runs = tokenize_runs(builtin_set("narrative"), lm.tokenizer, max_tokens=32)
    expected = [direct_activations(lm.model, r.token_ids) for r in runs[:2]]
    spec = arch_spec(lm.model)

    def change_input(module, args, output):  # after the down projection has used it
        args[0].mul_(2)

    handles = [
        spec.down_module(lm.model, layer).register_forward_hook(change_input)
        for layer in range(len(spec.blocks(lm.model)))
    ]
    try:
        paths = llm2bids.record(
            tmp_path / "bids", model=lm, task="narrative", max_tokens=32, batch_size=1, verbose=0
        )
    finally:
        for handle in handles:
            handle.remove()
    for bold, want in zip(paths[:2], expected):
        np.testing.assert_array_equal(load_run(bold).by_layer(), want)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_cpu_writers_run_below_the_forward_pass_and_leave_its_priority_alone(tmp_path, monkeypatch):
    """On the CPU the writers share the cores with the forward pass: they run at a higher
    niceness, the recording's own thread (which computes the forward pass) keeps its own."""
    from llm2bids.recording import writer

    seen = []
    write_layers = writer.RunWriter._write_layers

    def spy(self, *args):
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))  # 0: the calling thread on Linux
        write_layers(self, *args)

    monkeypatch.setattr(writer.RunWriter, "_write_layers", spy)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before >= 19:
        pytest.skip("the tests run at the lowest priority already: the writers cannot go lower")
    paths = llm2bids.record(
        tmp_path / "bids", model=_wide_llama(), task="narrative", max_tokens=32, verbose=0
    )
    assert len(seen) == len(paths) > 1
    assert set(seen) == {min(19, before + writer.CPU_WRITER_NICENESS)} != {before}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    pool, plain = writer.WriterPool(1), []  # a pool asked for no niceness: the caller's
    pool.wait([pool.submit(lambda: plain.append(os.getpriority(os.PRIO_PROCESS, 0)))])
    pool.close()
    assert plain == [before]


def test_batch_that_does_not_fit_in_memory_is_refused_before_writing(
    tmp_path, tiny_dir, monkeypatch
):
    import llm2bids.recording.recorder as recorder

    monkeypatch.setattr(recorder, "available_memory", lambda: 10_000)
    root = tmp_path / "bids"
    with pytest.raises(ResourceError, match=r"--batch-size.*--max-tokens.*--layers"):
        llm2bids.record(root, model=str(tiny_dir("llama")), task="narrative", verbose=0)
    assert not root.exists()  # nothing written, not even participants.tsv


def _wide_llama(device="cpu", dtype=torch.float32):
    """A llama whose MLP is wide enough (4096 neurons) that its buffers show in RSS."""
    config = CONFIGS["llama"]()
    config.intermediate_size = 4096
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(device, dtype)
    return wrap_model(model, tiny_tokenizer(), "wide-llama")


def _resident_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:")) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps_rollup")
def test_record_gives_its_buffers_back(tmp_path):
    """Host memory returns to its level before ``record``: no slot is left mapped."""
    from llm2bids.stimuli import heldout_text

    lm = _wide_llama()
    text = tmp_path / "long.txt"
    text.write_text(heldout_text())  # several 512-token runs
    kwargs = dict(model=lm, task="long", stimuli=text, max_tokens=512, batch_size=4, verbose=0)
    llm2bids.record(tmp_path / "warm", **kwargs)  # first-call allocations of torch and co.
    before = _resident_mb()
    llm2bids.record(tmp_path / "bids", **kwargs)
    after = _resident_mb()
    runs = find_runs(tmp_path / "bids")
    slot_mb = 4 * max(len(load_run(p).events) for p in runs) * 3 * 4096 * 4 / 2**20
    assert slot_mb >= 90  # the two slots would be >= 180 MB if they stayed
    assert after - before < 0.5 * slot_mb, (before, after)  # heap noise aside


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_round_trip_is_exact(tmp_path, dtype):
    """Recorded on CUDA (pinned copies) equals a hook on the same CUDA device, exactly."""
    lm = _wide_llama("cuda", dtype)
    paths = llm2bids.record(
        tmp_path / "bids", model=lm, task="narrative", max_tokens=64, batch_size=1, verbose=0
    )
    runs = tokenize_runs(builtin_set("narrative"), lm.tokenizer, max_tokens=64)
    for bold in paths[:3]:
        run = load_run(bold)
        stim = runs[int(bold.name.split("_run-")[1][:2]) - 1]
        np.testing.assert_array_equal(run.by_layer(), direct_activations(lm.model, stim.token_ids))


@pytest.mark.gpu
@needs_cuda
def test_cuda_recording_releases_host_and_device_memory(tmp_path):
    """Nothing stays allocated, reserved or page-locked after record(); a second recording in
    the same process writes the same bytes."""
    from llm2bids.models.hooks import hook_device
    from llm2bids.recording.resources import device_free_memory

    lm = _wide_llama("cuda", torch.bfloat16)
    assert hook_device(lm.model).type == "cuda"
    kwargs = dict(model=lm, task="narrative", max_tokens=256, batch_size=4, verbose=0)
    llm2bids.record(tmp_path / "warm", **kwargs)
    torch.cuda.synchronize()
    host, device = _resident_mb(), torch.cuda.memory_allocated()
    reserved, free = torch.cuda.memory_reserved(), device_free_memory("cuda")
    llm2bids.record(tmp_path / "bids", **kwargs)
    assert _resident_mb() - host < 30
    assert torch.cuda.memory_allocated() == device  # the stage is freed
    assert torch.cuda.memory_reserved() <= reserved  # and not kept in torch's cache
    assert device_free_memory("cuda") >= 0.99 * free
    for a, b in zip(find_runs(tmp_path / "warm"), find_runs(tmp_path / "bids")):
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("scale", [1.0, np.finfo(np.float32).max])  # x . x overflows, or not
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_finiteness_check_is_exact(bad, scale):
    from llm2bids.recording.writer import _finite

    values = np.full((5, 7), scale, dtype=np.float32)
    values[::2] *= -1
    if bad is not None:
        values[3, 4] = bad
    fine = np.ones((2, 7), dtype=np.float32)
    assert _finite([fine, values, fine]) is (bad is None)  # any array of a piece counts
    assert _finite([values]) is (bad is None)
