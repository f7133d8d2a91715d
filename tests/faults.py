"""Operating-system faults, injected: a read-only folder, a disk that fills.

Injected rather than mounted, so the tests run as any user on any machine (a read-only bind
mount or a small tmpfs needs root, and root ignores file permissions).
"""

from __future__ import annotations

import builtins
import errno
import io
import os

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_only(monkeypatch, folder) -> None:
    """Make every write, creation, rename or removal under ``folder`` fail with ``EROFS``."""
    folder = os.path.realpath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return real == folder or real.startswith(folder + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and kwargs.get("dir_fd") is None and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real, n_paths=1):
        def guarded(*args, **kwargs):
            for path in args[:n_paths]:
                if inside(path) and kwargs.get("dir_fd") is None:
                    refuse(path)
            return real(*args, **kwargs)

        return guarded

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), n_paths=2))
    for name in ("unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def disk_fills_after(monkeypatch, n_writes: int) -> None:
    """Let ``n_writes`` gather writes (``os.writev``: one per run piece) pass, then ``ENOSPC``.

    As a full disk reports it: the failing write call names no file.
    """
    real = os.writev
    count = {"n": 0}

    def writev(fd, buffers):
        count["n"] += 1
        if count["n"] > n_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
