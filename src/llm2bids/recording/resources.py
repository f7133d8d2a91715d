"""What the machine offers a recording: available memory and the disk's write speed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

PROBE_BYTES = 16 << 20


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``); ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_free_memory(device) -> int | None:
    """Bytes a new allocation can have on ``device``; ``None`` for the CPU and unknown devices.

    For CUDA: what the driver has free plus what torch's caching allocator holds reserved but
    unused (it hands that out first), so memory an earlier recording left cached in this
    process is not counted as taken.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0))


def write_speed(folder: str | Path) -> float:
    """Synced write speed of the disk holding ``folder``, in bytes per second.

    Measured once per disk and process by writing and syncing a 16 MB file (removed again).
    It is the sustained speed of a recording larger than the page cache; smaller recordings
    are written faster, into the page cache.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = os.stat(folder).st_dev
    if device not in _SPEEDS:
        _SPEEDS[device] = _probe(folder)
    return _SPEEDS[device]


_SPEEDS: dict[int, float] = {}


def _probe(folder: Path) -> float:
    path = folder / f".llm2bids-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    data = os.urandom(1 << 20) * (PROBE_BYTES >> 20)
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
        return PROBE_BYTES / max(time.perf_counter() - start, 1e-6)
    finally:
        path.unlink(missing_ok=True)
