"""What a stage shows while it runs inside a Prefect run: the library's log lines in the run's logs, and its long
loops as progress artifacts. Outside a run nothing changes: lines and bars go to the terminal only.

The library logs to stdlib loggers under ``clips4`` and knows nothing of Prefect. Prefect's own way to forward such
loggers, ``PREFECT_LOGGING_EXTRA_LOGGERS``, is read once, when Prefect is first imported (the flows import it before
this package), leaves the loggers at WARNING (so INFO lines are dropped), and sends from outside runs too (Prefect
then warns on every line). So :func:`observed` attaches an API log handler for the length of a stage instead.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging.handlers import APILogHandler
from prefect.utilities.context import get_task_and_flow_run_ids

from clips4.progress import reporting

P = ParamSpec("P")
R = TypeVar("R")

LIBRARY_LOGGER = "clips4"  # the library's loggers and this package's (clips4.tasks.*) are all below it
log = logging.getLogger(__name__)


def in_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (artifacts and run logs need one)."""
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    return task_run_id is not None or flow_run_id is not None


def best_effort(publish: Callable[P, R]) -> Callable[P, R | None]:
    """Publication is for people watching a run, never a reason for a stage to fail: outside a run it is skipped
    (Prefect deprecates artifacts without one), and inside one a failure is logged and the stage goes on."""

    @functools.wraps(publish)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if not in_run():
            return None
        try:
            return publish(*args, **kwargs)
        except Exception:
            log.warning("could not publish %s to Prefect; the stage goes on", publish.__name__, exc_info=True)
            return None

    return guarded


@best_effort
def _start_progress(description: str) -> uuid.UUID:
    return create_progress_artifact(0.0, description=description)


@best_effort
def _update_progress(artifact_id: uuid.UUID, percent: float) -> None:
    update_progress_artifact(artifact_id, percent)


def prefect_progress(description: str, total: int) -> Callable[[int], None]:
    """A :data:`clips4.progress.Reporter` that shows one loop as a progress artifact of the current run."""
    artifact_id = _start_progress(description)
    if artifact_id is None:
        return lambda done: None
    return lambda done: _update_progress(artifact_id, min(100.0, 100.0 * done / total))


class _StampRun(logging.Filter):
    """Files records under the stage's run: the API handler otherwise looks the run up in the logging thread's
    context, which the library's worker threads do not have."""

    def __init__(self, task_run_id: uuid.UUID | None, flow_run_id: uuid.UUID) -> None:
        super().__init__()
        self.task_run_id, self.flow_run_id = task_run_id, flow_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "flow_run_id", None) is None:
            record.flow_run_id, record.task_run_id = self.flow_run_id, self.task_run_id
        return True


@contextmanager
def observed() -> Iterator[None]:
    """Inside a Prefect run: send the ``clips4`` loggers' lines to the run's logs and report ``track`` loops as
    progress artifacts, for the length of the block.

    The terminal keeps showing each line once, through the root logger's handler, as before. A ``clips4`` logger
    left at NOTSET logs at the run logger's level meanwhile (Prefect's ``PREFECT_LOGGING_LEVEL``); a level set by
    the user is kept. A logger Prefect already forwards (``PREFECT_LOGGING_EXTRA_LOGGERS=clips4``) gets no second
    handler, so no line reaches the run twice.
    """
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    if task_run_id is None and flow_run_id is None:
        yield
        return
    logger = logging.getLogger(LIBRARY_LOGGER)
    level = logger.level
    handler = None
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        if flow_run_id is not None:
            handler.addFilter(_StampRun(task_run_id, flow_run_id))
        logger.addHandler(handler)
    if level == logging.NOTSET:
        logger.setLevel(logging.getLogger("prefect.flow_runs").getEffectiveLevel())
    try:
        with reporting(prefect_progress):
            yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
