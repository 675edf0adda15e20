"""Work ahead of and behind a model: results in order across ranges, skipped and retried ranges, errors where they
belong, and writes that finish before their context is left."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.data.io import BadImageError
from clips4.data.prepare import read_square_batch
from clips4.overlap import WorkAhead, WriteBehind


@pytest.mark.parametrize(("workers", "processes"), [(0, False), (2, False), (2, True)])
def test_ranges_come_in_order_across_boundaries_skips_and_retries(workers: int, processes: bool) -> None:
    jobs = [(i, 2) for i in range(12)]
    with WorkAhead(pow, jobs, workers, ahead=3, processes=processes) as work:
        assert list(work.take(0, 4)) == [0, 1, 4, 9]
        first = work.take(4, 8)
        assert next(first) == 16  # the reader of [4, 8) fails after one item...
        first.close()
        assert list(work.take(4, 8)) == [16, 25, 36, 49]  # ...and its retry reads the whole range again
        assert list(work.take(9, 12)) == [81, 100, 121]  # job 8 is skipped
        assert list(work.take(0, 2)) == [0, 1]  # a range already read, asked again
        assert list(work.take(12, 12)) == []


@pytest.mark.parametrize("processes", [False, True])
def test_an_error_is_raised_where_its_job_is_read(tmp_path: Path, processes: bool) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((6, 4, 3), 7, np.uint8)).save(good)
    jobs = [([good, good], 4), ([tmp_path / "missing.png"], 4), ([good], 4)]
    with WorkAhead(read_square_batch, jobs, 1, ahead=3, processes=processes) as work:
        batches = work.take(0, 3)
        first = next(batches)
        assert first.shape == (2, 4, 4, 3) and (first == 7).all()
        with pytest.raises(BadImageError, match="missing.png"):
            next(batches)
        assert next(work.take(2, 3)).shape == (1, 4, 4, 3)


def test_a_failed_write_is_raised_by_the_next_submit_and_by_close_and_writes_queued_behind_it_still_run() -> None:
    done: list[int] = []
    queued = threading.Event()

    def write(i: int) -> None:
        if i == 0:
            queued.wait(30)
            raise OSError("disk full")
        done.append(i)

    writer = WriteBehind(depth=1)
    writer.submit(write, 0)
    writer.submit(write, 1)
    queued.set()
    with pytest.raises(OSError, match="disk full"):
        writer.submit(write, 2)  # two calls pending: it waits for the first, sees it fail, and queues nothing
    with pytest.raises(OSError, match="disk full"):
        writer.check()
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert done == [1]


def test_check_does_not_wait_and_close_waits_for_every_write_in_order() -> None:
    done: list[int] = []
    release = threading.Event()

    def write(i: int) -> None:
        if i == 0:
            release.wait(30)
        done.append(i)

    writer = WriteBehind(depth=1)
    writer.submit(write, 0)
    writer.submit(write, 1)
    writer.check()
    assert done == []
    release.set()
    writer.close()
    assert done == [0, 1]


def test_leaving_the_context_waits_for_every_write_even_on_an_error() -> None:
    done: list[int] = []
    release = threading.Event()

    def write(i: int) -> None:
        release.wait(5)
        done.append(i)

    with pytest.raises(KeyError):
        with WriteBehind(depth=2) as writer:
            for i in range(3):
                writer.submit(write, i)
            release.set()
            raise KeyError("the caller's own error")
    assert done == [0, 1, 2]


def test_writes_of_several_threads_overlap_and_the_bound_holds() -> None:
    both = threading.Barrier(2, timeout=30)  # broken (an error) unless two writes run at once
    running: list[int] = []

    def write(i: int) -> None:
        running.append(i)
        both.wait()

    with WriteBehind(depth=1, threads=2) as writer:
        writer.submit(write, 0)
        writer.submit(write, 1)
        writer.submit(write, 2)  # waits for 0 to end: 0 and 1 must have run together
        assert running[:2] == [0, 1]
        writer.submit(write, 3)
    assert sorted(running) == [0, 1, 2, 3]
