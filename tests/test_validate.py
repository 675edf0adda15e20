"""Input validation: bad files stop the run with a clear message, or are set aside, and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_datasets import label_of, write_jpg, write_voc

from clips4.config import DataConfig
from clips4.data.datasets import get_dataset, voc_palette
from clips4.data.io import write_png
from clips4.data.validate import BadInputError, validate_records

BAD = {
    "b_truncated": "cannot be decoded",
    "c_wrong_size": "label is 9x4 (WxH) but its image",
    "d_out_of_range": "label has values 37",
    "e_no_label": "does not exist",
}


@pytest.fixture
def voc_with_bad_files(tmp_path: Path):
    root = write_voc(tmp_path, {"train": ["a_good", *BAD, "f_good"]})
    image = root / "JPEGImages" / "b_truncated.jpg"
    write_jpg(image, size=(64, 64))  # big enough that cutting it leaves a valid header and missing data
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    write_png(root / "SegmentationClass" / "c_wrong_size.png", label_of([1], (4, 9)), palette=voc_palette())
    write_png(root / "SegmentationClass" / "d_out_of_range.png", label_of([1, 37]), palette=voc_palette())
    (root / "SegmentationClass" / "e_no_label.png").unlink()
    ds = get_dataset(DataConfig(dataset="voc21", root=root))
    return ds, ds.records("train")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        os.path.join(d, f): (os.stat(os.path.join(d, f)).st_mtime_ns, os.stat(os.path.join(d, f)).st_size)
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_collects_every_problem_and_keeps_good_records(voc_with_bad_files, num_workers: int) -> None:
    ds, records = voc_with_bad_files
    before = _snapshot(ds.root)
    report = validate_records(records, ds, "skip", num_workers=num_workers)
    assert [r.image_id for r in report.good] == ["a_good", "f_good"]
    assert [p.image_id for p in report.problems] == list(BAD)
    for problem in report.problems:
        assert BAD[problem.image_id] in problem.problem
    by_id = {p.image_id: p.path for p in report.problems}
    assert by_id["b_truncated"].endswith("JPEGImages/b_truncated.jpg")
    assert by_id["c_wrong_size"].endswith("SegmentationClass/c_wrong_size.png")
    assert by_id["d_out_of_range"].endswith("SegmentationClass/d_out_of_range.png")
    assert by_id["e_no_label"].endswith("SegmentationClass/e_no_label.png")
    assert _snapshot(ds.root) == before  # validation never writes


@pytest.mark.parametrize("bad", list(BAD))
def test_error_policy_names_the_file_the_problem_and_the_remedy(voc_with_bad_files, bad: str) -> None:
    ds, records = voc_with_bad_files
    subset = [r for r in records if r.image_id in ("a_good", bad)]
    with pytest.raises(BadInputError) as caught:
        validate_records(subset, ds, "error", num_workers=2)
    message = str(caught.value)
    assert bad in message and BAD[bad] in message
    assert "--set data.on_bad_input=skip" in message
    assert caught.value.problem.image_id == bad


def test_error_policy_passes_good_records_through(voc_with_bad_files) -> None:
    ds, records = voc_with_bad_files
    good = [r for r in records if r.image_id.endswith("good")]
    assert validate_records(good, ds, "error").good == good
    with pytest.raises(ValueError, match="policy must be 'error' or 'skip'"):
        validate_records(good, ds, "ignore")  # type: ignore[arg-type]


def test_unlabelled_records_only_check_the_image(tmp_path: Path) -> None:
    write_jpg(tmp_path / "ok.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    ds = get_dataset(DataConfig(dataset="imagefolder", root=tmp_path))
    report = validate_records(ds.records("train"), ds, "skip")
    assert [r.image_id for r in report.good] == ["ok"]
    assert [p.path for p in report.problems] == [str(tmp_path / "broken.png")]
    assert report.good[0].label_path is None
