"""Ending ``clips4 run`` by a signal: SIGTERM (a scheduler's timeout) and SIGINT stop it with one error line and exit
code 128 + signal, keep its staged work for a rerun, and leave no process behind; after SIGKILL the temporary Prefect
server goes too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import tiny_cli

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

HANG_GUARD_S = 300  # generous bounds that only keep a broken test from hanging


class Run:
    """``clips4 run`` of the tiny world detached from the terminal by setsid, with its output collected as it
    comes."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *overrides: str) -> None:
        self.store = tmp_path / "store"
        args = [sys.executable, "-m", "clips4.flows.cli", "run", "--store", str(self.store), *tiny_cli(*overrides),
                "--stages", "data,teacher,features"]
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # the run's own temporary server is under test
        env["PREFECT_HOME"] = str(tmp_path / "prefect")
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {HANG_GUARD_S} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def output(self) -> str:
        return "".join(self.lines)

    def kill_leftovers(self, pids: list[int]) -> None:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_run_cleanly_and_leaves_its_work_to_resume(tmp_path, child_env, signum, code) -> None:
    run = Run(tmp_path, child_env, "teacher.epochs=1000")  # a teacher stage that runs until the signal
    staging = run.store / ".staging"
    run.wait_for(lambda: run.descendants() and any(staging.glob("teacher-*")), "temporary server and teacher stage")
    children = run.descendants()
    try:
        run.proc.send_signal(signum)
        assert run.proc.wait(timeout=HANG_GUARD_S) == code, run.output()[-3000:]
        run.reader.join(timeout=30)
        last = [line for line in run.output().splitlines() if line.strip()][-1]
        assert last == f"error: interrupted by {signal.Signals(signum).name}; rerun the same command to resume"
        assert "Traceback" not in run.output(), run.output()[-3000:]
        assert _all_gone(children), f"left running: {[p for p in children if _alive(p)]}"
        assert any(staging.glob("teacher-*")), "the interrupted stage's work must stay for a rerun to resume"
        assert any(run.store.glob("data/data-*/manifest.json")), "the finished data stage is published"
    finally:
        run.kill_leftovers(children)


@pytest.mark.slow
def test_the_temporary_server_dies_with_a_killed_run(tmp_path, child_env) -> None:
    run = Run(tmp_path, child_env, "teacher.epochs=1000")
    run.wait_for(lambda: bool(run.descendants()), "temporary server")
    children = run.descendants()
    try:
        run.proc.kill()
        assert run.proc.wait(timeout=HANG_GUARD_S) == -signal.SIGKILL
        assert _all_gone(children), f"left running after SIGKILL: {[p for p in children if _alive(p)]}"
    finally:
        run.kill_leftovers(children)


def test_the_first_signal_interrupts_and_later_ones_wait_for_the_cleanup() -> None:
    from clips4.flows.server import Interrupted, interruptible

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as raised, interruptible():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal during cleanup changes nothing
            time.sleep(0.1)
    assert raised.value.signum == signal.SIGTERM and isinstance(raised.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_configured_prefect_server_is_used_and_none_is_started(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from clips4.flows import server

    monkeypatch.setattr(server, "_start", lambda *a: pytest.fail("started a server although PREFECT_API_URL is set"))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), server.prefect_api():
        assert PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
