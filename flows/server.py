"""How ``clips4 run`` hosts Prefect: a temporary server owned by this process, signals that end a run cleanly, and
a terminal that shows Prefect's error lines without their tracebacks.

Prefect's own ephemeral server (``SubprocessASGIServer``) is stopped only by an ``atexit`` hook, which neither SIGTERM
(a job scheduler's timeout) nor SIGKILL runs, so every killed run left a ~220 MB server behind. Here the run starts
the same server itself, in the main thread, as a child that Linux kills when this process dies (PR_SET_PDEATHSIG),
and points ``PREFECT_API_URL`` at it for the run; a server the user configured in ``PREFECT_API_URL`` is used as is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import httpx
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker, PrefectConsoleHandler
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT_S = 10.0  # uvicorn shuts down gracefully on SIGTERM; a server that hangs is killed after this
DRAIN_TIMEOUT_S = 5.0  # for the run's last logs and events, as Prefect's own flush allows
ADDRESS_IN_USE = 3  # uvicorn's exit code when its port was taken between our probe and its bind
LOG_MAX_BYTES = 8 << 20
# A first start creates the database in a fresh PREFECT_HOME; on a busy machine that takes longer than Prefect's
# default startup timeout (20 s), which is used when it is longer than this.
MIN_STARTUP_S = 90


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived. A KeyboardInterrupt, so Prefect and the stages treat it as Ctrl-C (the run is marked
    crashed, staging folders stay for a rerun to resume) and no ``except Exception`` takes it for a failure."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class ServerError(RuntimeError):
    """The temporary Prefect server did not come up; the message says what to do instead."""


@contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn ``signals`` into :class:`Interrupted` in the main thread, so ``finally`` blocks stop the server.

    Only the first signal raises: later ones are ignored so that the cleanup they would interrupt finishes (it is
    bounded; SIGKILL still works). Prefect's flow engine swaps its own SIGTERM handler in during a flow and, once it
    has marked the run crashed, hands the signal back to this one."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies, even by SIGKILL.

    Linux only (elsewhere None: the server is still stopped on SIGTERM/SIGINT, just not after SIGKILL). libc is
    looked up here, before the fork, so the child only makes the call. The kernel ties the signal to the forking
    thread, hence the server is started from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _server_log() -> Path:
    """Where the server writes: its services log tracebacks when stopped mid-flush, noise on the run's terminal.
    One file per PREFECT_HOME, appended to by every run and started afresh past LOG_MAX_BYTES."""
    log = get_current_settings().home / "clips4-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.is_file() and log.stat().st_size > LOG_MAX_BYTES:
        log.replace(log.with_suffix(".log.1"))
    return log


def _start(port: int, log: Path) -> subprocess.Popen[bytes]:
    """Prefect's ephemeral server app under uvicorn: no UI, only the services an ephemeral server runs, this
    process's Prefect settings (PREFECT_HOME and its database). setsid detaches it from the terminal, so a Ctrl-C
    there reaches only this process, which still needs the server to record the run's final state before stopping
    it."""
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent_hook(), start_new_session=True)


def _drain() -> None:
    """Send the run's queued logs and events while the server still listens; without this their workers retry a
    stopped server at exit for a minute and then print connection errors."""
    APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> bool:
    """True once the API answers; False if the server exited because its port was taken; ServerError otherwise."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = process.poll()
            if code == ADDRESS_IN_USE:
                return False
            if code is not None:
                raise ServerError(f"the temporary Prefect server exited with code {code} (its output is in {log}); "
                                  f"fix that or set PREFECT_API_URL to a running Prefect server")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise ServerError(f"the temporary Prefect server did not answer within {timeout:.0f} s (its output is in "
                      f"{log}); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a "
                      f"running Prefect server")


@contextmanager
def prefect_api(say: Callable[[str], None] = print) -> Iterator[None]:
    """Run the body against the Prefect API in PREFECT_API_URL, else against a temporary server that stops on exit.

    With ephemeral mode turned off and no URL, nothing is started and Prefect reports that itself."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        yield
        return
    log = _server_log()
    for _ in range(3):
        port = _free_port()
        process = _start(port, log)
        address = f"http://127.0.0.1:{port}"
        try:
            timeout = max(settings.server.ephemeral.startup_timeout_seconds, MIN_STARTUP_S)
            healthy = _wait_healthy(process, f"{address}/api", timeout, log)
        except BaseException:
            _stop(process)
            raise
        if healthy:
            break
        _stop(process)
    else:
        raise ServerError("no free port for the temporary Prefect server; set PREFECT_API_URL to a running server")
    say(f"temporary Prefect server on {address} (stops with this run)")
    try:
        # It serves no UI, so no "View at" links to it (an empty UI URL turns them off)
        with temporary_settings(updates={PREFECT_API_URL: f"{address}/api", PREFECT_UI_URL: ""}):
            try:
                yield
            finally:
                _drain()
    finally:
        _stop(process)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, minus its traceback. Prefect's API handler formats the record on its own,
    so the run log keeps the traceback while the terminal gets one line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def terminal_without_tracebacks() -> None:
    """Drop tracebacks from Prefect's console log lines (a failed task logs one of ~100 lines): the CLI ends with one
    ``error:`` line instead, and ``--debug`` keeps them."""
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}
    for handler in (h for h in handlers if isinstance(h, PrefectConsoleHandler)):
        if handler.formatter is not None and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))
