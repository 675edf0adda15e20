"""Shared fixtures: a tiny synthetic world configuration and a Prefect test harness for flow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Runs of the pipeline in these tests are small; keep torch from oversubscribing the 2 cores with Prefect's threads.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

TINY = [
    "data.synthetic.num_train=24",
    "data.synthetic.num_val=8",
    "data.synthetic.num_test=8",
    "data.synthetic.image_size=32",
    "data.train_resolution=32",
    "data.regions.n_segments=16",
    "teacher.epochs=1",
    "teacher.num_images=32",
    "teacher.batch_size=8",
    "features.resolution=32",
    "features.shard_size=8",
    "features.batch_size=4",
    "cluster.num_unknown=2",
    "cluster.sample_size=400",
    "train.steps=3",
    "train.batch_size=4",
    "train.input_size=32",
    "train.checkpoint_every=2",
    "train.lambda_contrast=1",  # the demo trains without L_sem; these tests run all three losses
    "train.lambda_sem=1",
    "train.refresh_every=2",
    "evaluate.probe_epochs=1",
    "evaluate.num_pictures=2",
]


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Each test that takes ``device`` runs on the CPU and, where one is present, on the GPU."""
    if request.param == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    return request.param


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for a Python child process that imports this checkout, ahead of any PYTHONPATH already set."""
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def tiny() -> list[str]:
    """Overrides of the demo preset that make every stage take seconds."""
    return list(TINY)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
