"""A real Prefect server on loopback, `clips4 serve`, and a deployment run started with `prefect deployment run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clips4.storage import Store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server did not become healthy:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_served_pipeline_deployment_runs_to_completion(tmp_path, tiny) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    store = tmp_path / "store"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    served = None
    try:
        _wait_healthy(api, server, server_log)
        served = subprocess.Popen(
            [str(BIN / "clips4"), "serve", "--store", str(store)],
            env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        run = None
        deadline = time.time() + 120
        while time.time() < deadline:  # the deployments exist once `serve` has registered them
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "clips4-pipeline/default", "--watch",
                 "--param", "preset=demo", "--param", f"overrides={json.dumps(tiny)}",
                 "--param", 'stages=["data"]'],
                env=env, capture_output=True, text=True, timeout=600,
            )
            if "not found" not in (run.stdout + run.stderr).lower():
                break
            time.sleep(2)
        assert run is not None and run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{serve_log.read_text()[-3000:]}"
        assert [m.kind for m in Store(store).list()] == ["data"]
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
