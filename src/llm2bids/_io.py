"""Atomic writes and dataset locks.

An interrupted run must never leave a file that looks complete. Every file is written under a
hidden temporary name in its final folder (hidden files are ignored by the BIDS validator and by
pybids) and renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from filelock import FileLock

TMP_MARK = ".llm2bids-tmp-"
LOCK_NAME = ".llm2bids.lock"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file is removed on any exception (including ``KeyboardInterrupt``), so the
    final name only ever holds a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the full suffix (.nii.gz) so that libraries choosing a format by extension still can.
    # The writer's PID is in the name, so a cleanup never removes a live process's file.
    tmp = path.with_name(f"{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None or (err.filename is not None and TMP_MARK not in str(err.filename)):
            raise
        # a write() that failed names no file, a temporary means nothing to the user: say
        # which file could not be written
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return write_text(
        path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def write_tsv(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write a BIDS TSV atomically: tab separated, no index, missing values as ``n/a``."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising a clear error naming the file when it does not parse."""
    from .exceptions import DatasetError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}). Fix or delete the file.") from err


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files that interrupted (killed) runs left under ``folder``.

    Files whose writing process is still alive are kept: another job may be writing them.
    """
    count = 0
    for tmp in Path(folder).rglob(f"{TMP_MARK}*"):
        if _writer_alive(tmp.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            count += 1
    return count


def _writer_alive(name: str) -> bool:
    pid = name[len(TMP_MARK) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def dataset_lock(root: str | os.PathLike, timeout: float = 600) -> FileLock:
    """Return the inter-process lock guarding a dataset's shared files.

    Shared files (``participants.tsv``, ``dataset_description.json``, task sidecars) are
    read-modified-written only while this lock is held, so separate processes (a job array)
    can record into one dataset at once.
    """
    Path(root).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(root) / LOCK_NAME), timeout=timeout)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
