"""Drop-behind for large sequential writes: a file's pages leave the page cache as it is written.

A recording writes gigabytes that nothing reads back soon (analysis comes later, in another
process). Written through the page cache as is, every byte takes a page of memory that has not
been used in a while: on a VM whose freed memory goes back to the hypervisor (virtio-balloon
free page reporting, as on this project's 2-core VM), touching such a page costs a fault in
the host, about 3.5 s of CPU per GB (measured: 800 MB written in 2.7-3.5 s of CPU, cold). With
drop-behind the file's writeback is started every :data:`CHUNK_BYTES` and the chunk written
two chunks earlier, clean by then, is dropped from the cache: the pages the next writes take
are the ones just freed, still resident, and the cache holds a few chunks per file instead of
the whole recording (the same 800 MB in 0.3-0.9 s of CPU). Nothing ever waits for the disk
here: a chunk still being written back when its turn comes is left in the cache, as without
drop-behind. Starting writeback can wait for the disk's queue, though: a producer faster than
the disk (ready tensors on the CPU path, in the host-pipeline benchmark) is held to the disk's
speed, which is why staged recordings, whose activations come at the bus's pace, do not use it
(see :attr:`llm2bids.recording.pipeline.MemoryPlan.drops_behind`).

Linux only (``sync_file_range``, ``posix_fadvise``); elsewhere writes stay plain buffered
writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

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

    Notes
    -----
    Call :meth:`wrote` after each write with the bytes it wrote, and :meth:`close` once the
    file is complete. Both only advise the kernel: a refusal (a file system without
    writeback, ``EINVAL``) turns drop-behind off for the file and leaves the data as written.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.written = 0
        self.started = 0  # writeback started for [0, started)
        self.dropped = 0  # dropped from the cache: [0, dropped)
        self._start = _sync_file_range()

    def wrote(self, n_bytes: int) -> None:
        """Account for ``n_bytes`` more written; start and drop whole chunks behind them."""
        self.written += n_bytes
        while self._start is not None and self.written - self.started >= CHUNK_BYTES:
            self._writeback(self.started, CHUNK_BYTES)
            self.started += CHUNK_BYTES
            if self.started - self.dropped >= 3 * CHUNK_BYTES:
                self._drop(self.dropped, CHUNK_BYTES)
                self.dropped += CHUNK_BYTES

    def close(self) -> None:
        """Start writeback of the rest and drop what is already clean (files of less than
        a chunk are left as written: there is little to gain)."""
        if self._start is None or self.started == 0 or self.written == self.started:
            return
        self._writeback(self.started, self.written - self.started)
        self.started = self.written
        self._drop(self.dropped, 0)  # to the end: pages still being written back stay

    def _writeback(self, offset: int, length: int) -> None:
        if self._start(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            self._start = None

    def _drop(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._start = None
