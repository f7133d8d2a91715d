"""Drop-behind for large sequential writes: a file's pages leave the page cache as it is written.

A recording writes gigabytes that nothing reads back soon (analysis comes later, in another
process). Written through the page cache as is, every byte takes a page of memory that has not
been used in a while: on a VM whose freed memory goes back to the hypervisor (virtio-balloon
free page reporting, as on this project's 2-core VM), touching such a page costs a fault in
the host, about 3.5 s of CPU per GB (measured: 800 MB written in 2.7-3.5 s of CPU, cold). With
drop-behind the file's writeback is started every :data:`CHUNK_BYTES` and the chunk written
two chunks earlier, clean by then, is dropped from the cache: the pages the next writes take
are the ones just freed, still resident, and the cache holds a few chunks per file instead of
the whole recording (the same 800 MB in 0.3-0.9 s of CPU).

Nothing waits for the disk: the writer only queues its advice, and one background thread
(:class:`_Flusher`, per process) gives it to the kernel. Starting writeback can wait for the
disk's queue; a writer faster than the disk would be held to the disk's speed if it did that
itself (ready tensors on the CPU path were, in the host-pipeline benchmark: 0.23 of a plain
write instead of 0.5). A chunk still being written back when its drop comes is left in the
cache, as without drop-behind.

Linux only (``sync_file_range``, ``posix_fadvise``); elsewhere writes stay plain buffered
writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import queue
import threading

CHUNK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range, do not wait


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range``, or ``None`` where there is none (not Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class DropBehind:
    """Follows the writes of one file descriptor (see the module docstring).

    Parameters
    ----------
    fd : int
        A file opened for writing, written sequentially from offset 0.
    enabled : bool, default=True
        ``False``: every call does nothing (plain buffered writes).

    Notes
    -----
    Call :meth:`wrote` after each write with the bytes it wrote, and :meth:`close` once the
    file is complete (or use it as a context manager, which closes it on success and only
    lets go of the file on an exception). Both only queue advice for the background thread,
    which works on its own duplicate of ``fd`` (so ``fd`` may be closed at once). A refusal
    (a file system without writeback, ``EINVAL``) turns drop-behind off for the file; the
    data stays as written either way.
    """

    def __init__(self, fd: int, enabled: bool = True):
        self.written = 0
        self.started = 0  # writeback asked for [0, started)
        self.dropped = 0  # dropping asked for [0, dropped)
        self._file: _AdvisedFile | None = None
        self._fd = fd
        self.enabled = enabled

    def __enter__(self) -> DropBehind:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:  # the file is being removed: nothing more to advise
            self._advise("close", 0, 0)
            self._file = None

    def wrote(self, n_bytes: int) -> None:
        """Account for ``n_bytes`` more written; start and drop whole chunks behind them."""
        self.written += n_bytes
        while self.enabled and self.written - self.started >= CHUNK_BYTES:
            if self._advise("writeback", self.started, CHUNK_BYTES) is None:
                return
            self.started += CHUNK_BYTES
            if self.started - self.dropped >= 3 * CHUNK_BYTES:
                self._advise("drop", self.dropped, CHUNK_BYTES)
                self.dropped += CHUNK_BYTES

    def close(self) -> None:
        """Start writeback of the rest and drop what is clean by then (files of less than a
        chunk are left as written: there is little to gain)."""
        if self._file is None:
            return
        if self.written > self.started:
            self._advise("writeback", self.started, self.written - self.started)
            self.started = self.written
        self._advise("drop", self.dropped, 0)  # to the end: pages still written back stay
        self._advise("close", 0, 0)
        self._file = None

    def _advise(self, what: str, offset: int, length: int):
        if self._file is None:
            start = _sync_file_range()
            if start is None:
                return None
            self._file = _AdvisedFile(os.dup(self._fd), start)
        _flusher().put((self._file, what, offset, length))
        return self._file


class _AdvisedFile:
    """A duplicate descriptor of a file being written, and the kernel call that starts its
    writeback; used by the background thread only."""

    def __init__(self, fd: int, start):
        self.fd = fd
        self.start = start
        self.refused = False

    def advise(self, what: str, offset: int, length: int) -> None:
        if what == "close":
            os.close(self.fd)
        elif self.refused:
            return
        elif what == "writeback":
            self.refused = self.start(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0
        else:
            try:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                self.refused = True


class _Flusher:
    """The process's background thread that gives queued advice to the kernel, in order."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        threading.Thread(target=self._run, name="llm2bids-writeback", daemon=True).start()

    def put(self, item) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            advised, what, offset, length = self._queue.get()
            with contextlib.suppress(OSError):  # advice only: the data is written already
                advised.advise(what, offset, length)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued piece of advice is given; whether it was in time."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


@functools.cache
def _flusher() -> _Flusher:
    return _Flusher()


if hasattr(os, "register_at_fork"):  # a forked child has no copy of the thread: its own
    os.register_at_fork(after_in_child=_flusher.cache_clear)


def wait_for_advice(timeout: float | None = None) -> bool:
    """Block until the background thread has given the kernel all queued advice (tests)."""
    return _flusher().wait(timeout)
