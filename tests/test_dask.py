"""The features stage on a Dask cluster: the same arrays as a local run, and a worker killed mid-run neither hangs
the run nor loses a shard."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from clips4.flows.pipeline import execute
from clips4.storage import Store
from clips4.tasks.readers import FeaturesArtifact
from conftest import tiny_config

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, as `dask worker --nthreads 1` starts them (each behind a nanny that
    restarts it), shared by the tests of this module so the workers import torch and clips4 once."""
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0", scheduler_port=0
    ) as local:
        yield local


@pytest.fixture(scope="module")
def source(tmp_path_factory, prefect_harness) -> Path:
    """A store holding the data and teacher artifacts of the tiny world."""
    root = tmp_path_factory.mktemp("dask") / "source"
    execute(tiny_config(), ["data", "teacher"], None, str(root))
    return root


@pytest.fixture
def built(source, tmp_path):
    """Copies of the built store, one per name, so each run starts from the same data and teacher."""
    return lambda name: Path(shutil.copytree(source, tmp_path / name))


def _features(root: Path, *extra: str) -> FeaturesArtifact:
    cfg = tiny_config("features.shard_size=4", *extra)
    (result,) = execute(cfg, ["features"], None, str(root))
    return FeaturesArtifact.open(Store(root), result.key)


def test_dask_run_equals_local_run(built, cluster) -> None:
    local = _features(built("local"))
    on_dask = _features(built("dask"), f"features.dask_address={cluster.scheduler_address}")
    assert on_dask.files.dir.name == local.files.dir.name, "the Dask address must not change the artifact key"
    assert local.keys("train") is None and on_dask.keys("train") is None  # no stage reads the train split's keys
    for split, name in (("train", "features"), ("val", "features"), ("val", "keys")):
        a, b = getattr(local, name)(split), getattr(on_dask, name)(split)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a[:]), np.asarray(b[:]))


class KillOnce(distributed.WorkerPlugin):
    """Kills the process of the first worker that starts a shard once another shard is done: a worker lost mid-shard."""

    name = "kill-once"

    def __init__(self, staging: str, flag: str) -> None:
        self.staging, self.flag = staging, flag

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith("features-shard"):
            return
        if not any(Path(self.staging).glob("features-*/.done/*")):
            return
        try:
            Path(self.flag).open("x").close()  # only the first worker to get here dies
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_is_replaced_and_the_run_finishes(built, cluster, tmp_path) -> None:
    root = built("killed")
    flag = tmp_path / "killed.flag"
    with distributed.Client(cluster, set_as_default=False) as client:
        client.register_plugin(KillOnce(str(root / ".staging"), str(flag)))
        try:
            out = _features(root, f"features.dask_address={cluster.scheduler_address}")
        finally:
            client.unregister_worker_plugin(KillOnce.name)
    assert flag.exists(), "no worker was killed"
    for split, n in (("train", 24), ("val", 8)):
        features = np.asarray(out.features(split)[:])
        assert features.shape[0] == n and np.isfinite(features).all() and np.abs(features).sum(axis=(1, 2, 3)).all()


def test_a_cluster_without_workers_fails_instead_of_waiting(built, monkeypatch) -> None:
    import clips4.tasks.features as features

    monkeypatch.setattr(features, "DASK_POLL_S", 0.2)
    monkeypatch.setattr(features, "DASK_NO_WORKERS_S", 1.0)
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0", scheduler_port=0) as empty:
        with pytest.raises(RuntimeError, match="no workers for 1 s"):
            _features(built("empty"), f"features.dask_address={empty.scheduler_address}")


def test_an_unreachable_scheduler_is_a_clear_error(built, monkeypatch) -> None:
    import clips4.tasks.features as features

    monkeypatch.setattr(features, "DASK_CONNECT_S", 1)
    with pytest.raises(RuntimeError, match="no Dask scheduler answers at tcp://127.0.0.1:9"):
        _features(built("nowhere"), "features.dask_address=tcp://127.0.0.1:9")
