"""Shared fixtures: the tests' tiny synthetic world configuration (tests/tiny.yaml) and a Prefect test harness for
flow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clips4.config import PipelineConfig, resolve_config

# Runs of the pipeline in these tests are small; keep torch from oversubscribing the 2 cores with Prefect's threads.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Prefect configures logging when its flow and task machinery is first imported, replacing the root logger's
# handlers. Done here, before any test starts, it cannot remove the handler a test's caplog put there.
from prefect import flow, task  # noqa: E402, F401

TINY_CONFIG = Path(__file__).resolve().with_name("tiny.yaml")


def tiny_config(*overrides: str) -> PipelineConfig:
    """The tiny world every stage runs in seconds (tests/tiny.yaml), with ``section.field=value`` overrides."""
    return resolve_config(config_file=TINY_CONFIG, overrides=list(overrides))


def tiny_cli(*overrides: str) -> list[str]:
    """The same configuration as arguments of ``clips4 run`` (and every command that takes --config and --set)."""
    return ["--config", str(TINY_CONFIG), *(arg for override in overrides for arg in ("--set", override))]


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


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
