"""Parallel work through joblib: processes on one machine, or the workers of a Dask cluster.

Every stage that can spread work calls :func:`parallel_map`; which engine runs it is joblib's
active backend. :func:`dask_cluster` makes that an existing Dask cluster for the code inside
it (joblib's ``dask`` backend), so the same stages run on a cluster without other changes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import joblib
from tqdm.auto import tqdm

from .exceptions import InputError


def parallel_map(
    fn: Callable, items: Iterable, n_jobs: int = 1, desc: str | None = None, verbose: int = 0
) -> list:
    """``[fn(item) for item in items]``, in parallel when ``n_jobs != 1``, in order.

    Parameters
    ----------
    fn : callable
        Picklable (a module-level function or a ``functools.partial`` of one).
    items : iterable
    n_jobs : int, default=1
        joblib's ``n_jobs``: ``1`` runs here, in this process; ``-1`` uses every core (or
        every Dask worker inside :func:`dask_cluster`).
    desc : str or None, default=None
        Label of the progress bar.
    verbose : int, default=0
        Show a progress bar (results as they arrive).
    """
    items = list(items)
    bar = functools.partial(tqdm, total=len(items), desc=desc, disable=not verbose)
    if n_jobs == 1 or len(items) < 2:
        return [fn(item) for item in bar(items)]
    jobs = joblib.Parallel(n_jobs=n_jobs, return_as="generator")
    return list(bar(jobs(joblib.delayed(fn)(item) for item in items)))


def cluster_n_jobs(n_jobs: int, address: str | None) -> int:
    """``n_jobs`` for work sent to the cluster at ``address``: 1 (the default) means all workers."""
    return -1 if address is not None and n_jobs == 1 else n_jobs


@contextlib.contextmanager
def dask_cluster(address: str | None, timeout: float = 10) -> Iterator[object]:
    """Run the joblib work inside the block on the Dask cluster at ``address``.

    Parameters
    ----------
    address : str or None
        The scheduler, e.g. ``"tcp://10.0.0.5:8786"``; ``None`` changes nothing.
    timeout : float, default=10
        Seconds to wait for the scheduler.

    Yields
    ------
    distributed.Client or None

    Raises
    ------
    InputError
        When ``distributed`` is not installed, or the scheduler cannot be reached.
    """
    if address is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as err:
        raise InputError(
            "--dask-scheduler needs the 'distributed' package: pip install 'llm2bids[dask]'."
        ) from err
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise InputError(
            f"cannot reach the Dask scheduler at {address!r} within {timeout:g} s ({err}). "
            "Check the address (tcp://HOST:PORT, as the scheduler prints it) and that the "
            "scheduler is running and reachable from this machine."
        ) from err
    try:
        with joblib.parallel_config(backend="dask"):
            yield client
    finally:
        client.close()
