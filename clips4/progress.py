"""One progress bar for all long work (rich), so every stage shows count, rate and time left the same way.

A caller that runs the library somewhere people watch from afar (the tasks layer, inside a Prefect run) installs a
:data:`Reporter` with :func:`reporting`; every :func:`track` loop in that context then also reports its count there,
throttled. The library itself knows nothing of where: without a reporter only the terminal bar is drawn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

Reporter = Callable[[str, int], Callable[[int], None]]
"""Called with a loop's description and total when the loop starts; returns the function told each new count."""

# A context variable, not a global: a reporter installed for one run never sees loops of another thread or task.
_reporter: ContextVar[Reporter | None] = ContextVar("clips4_progress_reporter", default=None)

REPORT_INTERVAL_S = 2.0
REPORT_FRACTION = 0.01


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Report every :func:`track` loop with a known total run in this context to ``reporter`` too."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


class Throttle:
    """Passes a loop's count on at most every ``interval`` seconds and ``fraction`` of the total, and always the last
    one, so a remote display costs a handful of calls per loop however many items it has."""

    def __init__(
        self,
        update: Callable[[int], None],
        total: int,
        interval: float = REPORT_INTERVAL_S,
        fraction: float = REPORT_FRACTION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.update, self.total, self.interval, self.clock = update, total, interval, clock
        self.min_items = fraction * total
        self.sent, self.sent_at = 0, clock()

    def __call__(self, done: int) -> None:
        now = self.clock()
        due = now - self.sent_at >= self.interval and done - self.sent >= self.min_items
        if done != self.sent and (done >= self.total or due):
            self.update(done)
            self.sent, self.sent_at = done, now


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over ``items`` with a bar showing count, rate in ``unit``/s and time left."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    reporter = _reporter.get()
    report = Throttle(reporter(description, total), total) if reporter is not None and total else None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(description, total=total, rate="")

        def finished(done: int) -> None:
            bar.advance(task)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f} {unit}/s")
            if report is not None:
                report(done)

        given = 0
        try:
            for item in items:
                given += 1
                yield item
                finished(given)
        finally:
            # A consumer that stops asking once it holds the last item (zip over a sequence of that length) never
            # resumes this loop after it; the item is counted when the loop is closed instead.
            if given == total and bar.tasks[task].completed < given:
                finished(given)
