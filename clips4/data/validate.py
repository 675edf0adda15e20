"""Check every file of a split before any stage uses it, so a bad file stops the run early or is set aside.

Reads only; never writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from clips4.data.datasets import Dataset
from clips4.data.io import BadImageError, check_pixels, exif_orientation, read_image
from clips4.data.records import Record
from clips4.progress import track


@dataclass(frozen=True)
class Problem:
    """Why one record cannot be used; ``path`` is the offending file (the image or its label)."""

    image_id: str
    path: str
    problem: str


@dataclass
class ValidationReport:
    good: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class BadInputError(ValueError):
    """A bad file under the 'error' policy; the message names the file, the problem and the remedy."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(
            f"bad input for image {problem.image_id!r}: {problem.path}: {problem.problem}. "
            "Fix or remove it, or rerun with --set data.on_bad_input=skip"
        )


def check_record(record: Record, dataset: Dataset, max_pixels: int | None = None) -> Problem | None:
    """Fully decode the image and, when there is one, the label: values must be the dataset's, sizes must agree.

    Either file with more than ``max_pixels`` pixels (data.max_pixels) is refused from its header, undecoded."""
    try:
        image = read_image(record.image_path, max_pixels)
        if record.label_path is None:
            return None
        check_pixels(record.label_path, max_pixels)
        label = dataset.read_label(record.label_path)
    except BadImageError as err:
        return Problem(record.image_id, err.path, err.problem)
    if label.shape != image.shape[:2]:
        # EXIF orientations 5 to 8 swap width and height: a label drawn on the sideways stored pixels shows up here.
        turned = label.shape == image.shape[1::-1] and exif_orientation(record.image_path) >= 5
        upright = " once turned upright by its EXIF orientation; label maps must match the upright image"
        return Problem(
            record.image_id,
            record.label_path,
            f"label is {label.shape[1]}x{label.shape[0]} (WxH) but its image {record.image_path} is "
            f"{image.shape[1]}x{image.shape[0]}" + (upright if turned else ""),
        )
    return None


def validate_records(
    records: Sequence[Record],
    dataset: Dataset,
    policy: Literal["error", "skip"] = "error",
    num_workers: int = 0,
    max_pixels: int | None = None,
) -> ValidationReport:
    """Check ``records`` in order. 'error' raises :class:`BadInputError` at the first bad file; 'skip' collects.

    ``num_workers`` > 0 checks files in that many threads (decoding releases the GIL); ``max_pixels`` is
    data.max_pixels (None: no limit).
    """
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', not {policy!r} (data.on_bad_input)")
    report = ValidationReport()
    # closing stops the workers on an early raise
    with closing(_checked(records, dataset, num_workers, max_pixels)) as problems:
        for record, problem in zip(records, problems):
            if problem is None:
                report.good.append(record)
            elif policy == "error":
                raise BadInputError(problem)
            else:
                report.problems.append(problem)
    return report


def _checked(
    records: Sequence[Record], dataset: Dataset, num_workers: int, max_pixels: int | None
) -> Iterator[Problem | None]:
    check = partial(check_record, dataset=dataset, max_pixels=max_pixels)
    if num_workers <= 0:
        yield from track(map(check, records), "validating", total=len(records), unit="img")
        return
    pool = ThreadPoolExecutor(num_workers)
    try:
        yield from track(pool.map(check, records), "validating", total=len(records), unit="img")
    finally:
        pool.shutdown(cancel_futures=True)
