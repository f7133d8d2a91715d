"""Parallel and cluster runs write the same derivatives as serial ones."""

import filecmp

import numpy as np
import pytest

from llm2bids.cli.main import main
from llm2bids.decomposition import FunctionalNetworks, run_networks
from llm2bids.exceptions import InputError
from synthetic import planted_networks, write_synthetic


@pytest.fixture(scope="module")
def planted_run_paths(tmp_path_factory):
    """The paths of three synthetic runs with planted neuron groups."""
    runs, _ = planted_networks(n_runs=3, n_tokens=150)
    return write_synthetic(tmp_path_factory.mktemp("planted_run_paths") / "bids", runs)


def _run(planted_run_paths, out, **kwargs):
    bids = planted_run_paths[0].parents[2]
    return run_networks(
        bids, out, n_components=4, n_permutations=10, verbose=0, scope="layer", **kwargs
    )


def _same_files(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    different = [f for f in files if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not different, different


def _serial(fn, *args, **kwargs):
    """A serial run with one BLAS thread, as each worker has (loky gives each of 2 workers
    on 2 cores one thread; Dask's nanny sets OPENBLAS_NUM_THREADS=1): an older OpenBLAS
    (numpy 1.24's) rounds differently with another number of threads, and the parallel
    machinery, which is what is tested here, must add no difference of its own."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return fn(*args, **kwargs)


def test_per_layer_fits_in_parallel_equal_serial(planted_run_paths):
    serial = _serial(
        FunctionalNetworks(n_components=2, scope="layer", n_jobs=1).fit, planted_run_paths
    )
    parallel = FunctionalNetworks(n_components=2, scope="layer", n_jobs=2).fit(planted_run_paths)
    np.testing.assert_array_equal(parallel.components_, serial.components_)
    np.testing.assert_array_equal(parallel.networks_, serial.networks_)


def test_parallel_and_dask_runs_write_the_serial_derivatives(planted_run_paths, tmp_path):
    distributed = pytest.importorskip("distributed")  # a test extra: installed by make test
    _serial(_run, planted_run_paths, tmp_path / "serial")
    _run(planted_run_paths, tmp_path / "jobs", n_jobs=2)
    _same_files(tmp_path / "serial", tmp_path / "jobs")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        _run(planted_run_paths, tmp_path / "dask", dask_scheduler=cluster.scheduler_address)
    _same_files(tmp_path / "serial", tmp_path / "dask")


def test_unreachable_scheduler_is_named_and_nothing_is_written(planted_run_paths, tmp_path, capsys):
    pytest.importorskip("distributed")
    address = "tcp://127.0.0.1:9"  # the discard port: nothing listens there
    with pytest.raises(InputError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        _run(planted_run_paths, tmp_path / "out", dask_scheduler=address)
    assert not (tmp_path / "out").exists()
    bids = planted_run_paths[0].parents[2]
    args = ["networks", str(bids), str(tmp_path / "cli"), "participant", "--n-components", "4"]
    assert main([*args, "--dask-scheduler", address]) == 2
    assert "tcp://127.0.0.1:9" in capsys.readouterr().err


def test_localizer_in_parallel_writes_the_serial_derivatives(recorded, tmp_path):
    from llm2bids.glm import run_localize

    for name, n_jobs in (("serial", 1), ("jobs", 2)):
        run_localize(recorded, tmp_path / name, task="langloc", n_jobs=n_jobs)
    _same_files(tmp_path / "serial", tmp_path / "jobs")
