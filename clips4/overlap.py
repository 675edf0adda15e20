"""Work overlapped with a model's forward passes, so the model never waits on the host: inputs are computed ahead of
it by workers (:class:`WorkAhead`), outputs are written behind it in a thread (:class:`WriteBehind`)."""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Generic, TypeVar

R = TypeVar("R")

log = logging.getLogger(__name__)


class WorkAhead(Generic[R]):
    """``fn(*job)`` of a fixed list of jobs, computed by ``workers`` threads up to ``ahead`` jobs before the one the
    caller reads, across the ranges it reads them in: the next range is under way while the caller finishes this one.
    With ``workers`` 0 each job is computed when it is read, in the reader's thread.

    Threads suit work that releases the GIL (decoding and resizing images); ``processes`` suits work that holds it
    (superpixels). Processes are spawned, not forked (the caller may run threads, Prefect does, and a fork copies
    their locks), and each imports the caller's main module first: a second or more per worker, worth paying only
    for work that outlasts it."""

    def __init__(self, fn: Callable[..., R], jobs: Sequence[tuple], workers: int, ahead: int,
                 processes: bool = False) -> None:
        self._fn, self._jobs, self._ahead = fn, jobs, max(1, ahead)
        self._pool: Executor | None = None
        if workers > 0:
            self._pool = (
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                if processes
                else ThreadPoolExecutor(workers, thread_name_prefix="work-ahead")
            )
        self._queue: deque[tuple[int, Future]] = deque()  # submitted jobs not read yet, consecutive indices
        self._next = 0  # the next job to submit

    def take(self, start: int, stop: int) -> Iterator[R]:
        """The results of jobs [start, stop), in order. Jobs before ``start`` that were computed but not read are
        dropped (their range was skipped); a range asked for again (its reader failed and is retried) is computed
        again, on its own."""
        if self._pool is None:
            yield from (self._fn(*job) for job in self._jobs[start:stop])
            return
        if start < (self._queue[0][0] if self._queue else self._next):
            again = [self._pool.submit(self._fn, *job) for job in self._jobs[start:stop]]
            try:
                for future in again:
                    yield future.result()
            finally:
                for future in again:
                    future.cancel()
            return
        while self._queue and self._queue[0][0] < start:
            self._queue.popleft()[1].cancel()
        self._next = max(self._next, start)
        for _ in range(start, stop):
            while len(self._queue) < self._ahead and self._next < len(self._jobs):
                self._queue.append((self._next, self._pool.submit(self._fn, *self._jobs[self._next])))
                self._next += 1
            yield self._queue.popleft()[1].result()

    def close(self) -> None:
        """Drop what was computed ahead and stop the workers."""
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WorkAhead[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteBehind:
    """Runs calls in background threads, started in the order given, while the caller computes the next output;
    :meth:`submit` first waits until at most ``depth`` calls are pending, so at most ``depth`` + 1 outputs are held
    here. With one thread the calls also end in order; with ``threads`` > 1 they may overlap (each writes its own
    files), for when one thread cannot write as fast as the caller computes.

    The first error of a call is raised by the next :meth:`submit` and by :meth:`close`; calls already waiting still
    run, so each one must leave its own output whole or not at all. Leaving the context waits for every call,
    whatever happened, so no write outlives the lock or the folder it writes into."""

    def __init__(self, depth: int = 1, threads: int = 1) -> None:
        self._depth = depth
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="write-behind")
        self._pending: deque[Future] = deque()
        self._error: BaseException | None = None

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` calls are pending (dropping finished ones), then raise the first error."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            error = self._pending.popleft().exception()
            self._error = self._error or error
        if self._error is not None:
            raise self._error

    def check(self) -> None:
        """Raise the first error of a call that has failed, without waiting for any."""
        self._settle(len(self._pending))

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``, first waiting while ``depth`` calls already wait; raises an earlier call's error."""
        self._settle(self._depth)
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        """Wait for every call, then raise the first error of any."""
        try:
            self._settle(0)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except Exception as late:
            if error is None:
                raise
            if late is not error:  # the caller's error propagates; this one is not lost
                log.error("a write behind failed as well: %r", late)
