"""A background thread that lays activations out as NIfTI runs and writes them.

The forward pass of the next batch runs while this thread copies the previous batch into the
NIfTI layout and writes it, so disk I/O overlaps with compute. A job is handed over only when
the previous one is written: at most two batches are in memory (one being written, one being
computed), however many runs there are.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("llm2bids.recording")

_STOP = object()


class BackgroundWriter:
    """Run ``fn(job)`` for each submitted job in one background thread.

    An exception raised by ``fn`` stops the writer and is re-raised in the caller at the next
    :meth:`submit` or at :meth:`close`.
    """

    def __init__(self, fn: Callable):
        self._fn = fn
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Semaphore(1)  # held while a job is queued or being written
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llm2bids-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                if self._error is None:  # after a failure, drain without work
                    self._fn(job)
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err
            finally:
                del job  # free the batch before the next one is handed over
                self._idle.release()

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job) -> None:
        """Hand ``job`` over; blocks until the previous job is written."""
        self._idle.acquire()
        try:
            self._raise()
        except BaseException:
            self._idle.release()
            raise
        self._queue.put(job)

    def close(self) -> None:
        """Finish the last job, stop the thread, and raise any error it met."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()
