"""A background thread that lays activations out as NIfTI runs and writes them.

The forward pass of the next batch runs while this thread copies the previous batch into the
NIfTI layout and writes it, so disk I/O overlaps with compute. The queue is bounded: at most
one batch waits, so memory does not grow with the number of runs.
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

    def __init__(self, fn: Callable, max_pending: int = 1):
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llm2bids-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None:
                continue  # drain without work after a failure
            try:
                self._fn(job)
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job) -> None:
        """Queue ``job``; blocks while a previous job is still waiting."""
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        """Finish the queued jobs, stop the thread, and raise any error it met."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()
