"""Staging that cannot lie: the features stage publishes only what done markers prove was computed, and its work in
staging is held under the key's lock from the first write to publication."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clips4.config import resolve_config
from clips4.flows.pipeline import execute
from clips4.storage import Store
from clips4.tasks.common import run_stage, stage_key
from clips4.tasks.features import finish_features
from clips4.tasks.readers import CLASSES, RECORDS, FeaturesArtifact
from conftest import TINY


def test_markers_of_any_shard_size_add_up_to_the_images_they_cover(tmp_path) -> None:
    out = FeaturesArtifact(Store(tmp_path).staging("features-0123456789"))
    assert out.missing("train", 24) == [(0, 24)]
    for lo, hi in [(0, 4), (4, 8), (8, 16), (20, 24), (2, 6)]:  # written by runs with shard sizes 4 and 8
        out.mark_done("train", lo, hi)
    out.mark_done("val", 0, 8)
    assert out.missing("train", 24) == [(16, 20)]
    assert out.missing("val", 8) == [] and out.missing("val", 10) == [(8, 10)]
    assert out.range_done("train", 8, 16) and not out.range_done("train", 0, 8)


def _tiny_upstream(store: Store) -> dict[str, str]:
    """A data artifact of 24 train and 8 val records, and an (empty) teacher artifact: enough to try publishing."""
    table = pd.DataFrame({"image_id": [str(i) for i in range(32)], "split": ["train"] * 24 + ["val"] * 8,
                          "image_path": "x.png", "label_path": None, "caption": None})

    def data(files) -> None:
        files.write_table(RECORDS, table)
        files.write_json(CLASSES, {"synonyms": [], "held_out": [], "palette": [], "ignore_index": 255})

    store.produce("data", "data-0123456789", data, config={}, upstream=[])
    store.produce("teacher", "teacher-0123456789", lambda files: None, config={}, upstream=[])
    return {"data": "data-0123456789", "teacher": "teacher-0123456789"}


def test_a_gap_in_the_markers_refuses_to_publish(tmp_path) -> None:
    store = Store(tmp_path)
    upstream = _tiny_upstream(store)
    cfg = resolve_config("demo", overrides=TINY)
    key = stage_key(cfg, "features", upstream)
    with store.building(key) as files:
        out = FeaturesArtifact(files)
        for split, lo, hi in [("train", 0, 8), ("train", 16, 24), ("val", 0, 8)]:
            out.mark_done(split, lo, hi)
        with pytest.raises(RuntimeError, match=r"images \[8, 16\) of split train were never computed"):
            run_stage(store, cfg, "features", upstream, lambda f: finish_features(cfg, store, upstream, f),
                      reset_staging=False)
    assert not store.exists(key), "a features artifact with a zero-filled gap was published"
    assert out.missing("train", 24) == [(8, 16)], "the markers of the finished work must stay for a rerun"


# ------------------------------------------------------------------------------------- runs in other processes
@pytest.fixture(scope="module")
def source(tmp_path_factory, prefect_harness) -> Path:
    """A store holding the data and teacher artifacts of the tiny world."""
    root = tmp_path_factory.mktemp("staging") / "source"
    execute(resolve_config("demo", overrides=TINY), ["data", "teacher"], None, str(root))
    return root


def _start_features(root: Path, log: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """``clips4 run --stages features`` in a child process, talking to the test harness's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    overrides = [*TINY, "features.shard_size=1", "features.batch_size=1", *extra]
    args = [sys.executable, "-m", "clips4.flows.cli", "run", "--preset", "demo", "--stages", "features",
            "--store", str(root), *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "COLUMNS": "200"}
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=300) == 0, f"the features run failed:\n{log.read_text()[-3000:]}"
    return log.read_text()


def _status(output: str) -> str:
    (row,) = [line for line in output.splitlines() if " features-" in line and ("computed" in line or "reused" in line)]
    return "computed" if "computed" in row else "reused"


@pytest.mark.slow
def test_two_identical_runs_at_once_compute_once(source, tmp_path) -> None:
    root = Path(shutil.copytree(source, tmp_path / "store"))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start_features(root, log, tmp_path) for log in logs]
    outputs = [_finish(proc, log) for proc, log in zip(procs, logs)]
    assert sorted(_status(out) for out in outputs) == ["computed", "reused"]
    assert len(Store(root).list("features")) == 1
    assert not any((root / ".staging").iterdir()), "staging debris remains after two identical runs"


@pytest.mark.slow
def test_gc_leaves_a_running_features_stage_alone(source, tmp_path) -> None:
    root = Path(shutil.copytree(source, tmp_path / "store"))
    log = tmp_path / "run.log"
    proc = _start_features(root, log, tmp_path)
    deadline = time.time() + 240
    while not (markers := list((root / ".staging").glob("features-*/.done/*"))):
        assert proc.poll() is None, f"the features run ended before gc could run:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no features shard finished in time"
        time.sleep(0.02)
    staging = markers[0].parent.parent
    report = Store(root).gc(older_than=0)
    assert staging.is_dir() and all(m.exists() for m in markers), f"gc removed a running build's work: {report}"
    assert not [r for r in report.removed if staging.name in r]
    _finish(proc, log)
    assert Store(root).exists(staging.name)
