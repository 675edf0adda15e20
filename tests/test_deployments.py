"""A real Prefect server on loopback, `clips4 serve`, and runs of its deployments started with `prefect deployment run`:
the pipeline, then the train stage alone with an override (features reused), then the evaluate stage alone."""

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
from conftest import TINY_CONFIG

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FLOWS = ["clips4-pipeline", "clips4-data", "clips4-teacher", "clips4-features", "clips4-cluster", "clips4-train",
         "clips4-evaluate"]


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


@pytest.fixture
def served(tmp_path):
    """A Prefect server and `clips4 serve --gpu-slots 1`; yields (run a deployment, env, store, serve log)."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="2")
    store = tmp_path / "store"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    serving = None
    try:
        _wait_healthy(api, server, server_log)
        serving = subprocess.Popen(
            [str(BIN / "clips4"), "serve", "--store", str(store), "--gpu-slots", "1"],
            env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

        def run(deployment: str, *params: str) -> subprocess.CompletedProcess:
            args = [str(BIN / "prefect"), "deployment", "run", deployment, "--watch"]
            for p in params:
                args += ["--param", p]
            deadline = time.time() + 120
            while True:  # the deployments exist once `serve` has registered them
                out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
                if "not found" not in (out.stdout + out.stderr).lower() or time.time() > deadline:
                    return out
                assert serving.poll() is None, serve_log.read_text()[-3000:]
                time.sleep(2)

        yield run, env, Store(store), serve_log
    finally:
        if serving is not None:
            _stop(serving)
        _stop(server)


def test_served_deployments_rerun_single_stages(served) -> None:
    run, env, store, serve_log = served
    tiny = ["preset=null", f"config_file={TINY_CONFIG}"]
    out = run("clips4-pipeline/default", *tiny)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{serve_log.read_text()[-3000:]}"
    kinds = [m.kind for m in store.list()]
    assert kinds == ["data", "teacher", "features", "cluster", "train", "evaluate"], kinds

    changed = [*tiny, 'overrides=["train.lr=0.01"]']
    out = run("clips4-train/default", *changed)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{serve_log.read_text()[-3000:]}"
    assert [m.kind for m in store.list()].count("features") == 1  # reused, not recomputed
    assert [m.kind for m in store.list("train")] == ["train", "train"]
    assert store.list("train")[-1].config["lr"] == 0.01

    out = run("clips4-evaluate/default", *changed)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{serve_log.read_text()[-3000:]}"
    evaluations = store.list("evaluate")
    assert len(evaluations) == 2 and store.list("train")[-1].key in evaluations[-1].upstream

    listed = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True)
    for name in FLOWS:
        assert f"{name}/default" in listed.stdout, listed.stdout
    limit = subprocess.run([str(BIN / "prefect"), "gcl", "inspect", "clips4-gpu", "--output", "json"], env=env,
                           capture_output=True, text=True)
    assert limit.returncode == 0 and json.loads(limit.stdout)["limit"] == 1, limit.stdout + limit.stderr

    bad = run("clips4-train/default", "preset=demo", 'overrides=["train.nope=1"]')
    assert bad.returncode != 0
    assert "train.nope: unknown field" in serve_log.read_text()
