"""Garbage collection around nilearn's readers.

nilearn up to 0.13 runs a full garbage collection before it reads each image
(``nilearn._utils.niimg.safe_get_data``). In a process that holds many Python objects (a
notebook with a model loaded, a test session) those collections, not the reading, become most
of a fit: 76% of the test suite's decomposition time under nilearn 0.11. :func:`frozen_gc`
moves the objects that exist when it starts out of the collector's sight (``gc.freeze``)
until it ends, so each collection scans only what the fit itself creates. Nothing is lost:
garbage among the frozen objects is collected after :func:`gc.unfreeze`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Freeze the objects that exist now for the duration of the block (see the module)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
