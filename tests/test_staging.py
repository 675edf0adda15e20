"""Staging that cannot lie: the features stage publishes only what done markers prove was computed, and its work in
staging is held under the key's lock from the first write to publication."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clips4.flows.pipeline import execute
import clips4.storage.formats as formats
from clips4.storage import Store
from clips4.tasks import features
from clips4.tasks.common import run_stage, stage_key
from clips4.tasks.features import finish_features
from clips4.tasks.readers import CLASSES, RECORDS, FeaturesArtifact
from conftest import tiny_cli, tiny_config


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
    cfg = tiny_config()
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


def test_a_range_is_sealed_before_its_marker_and_publication_reuses_its_digests(tmp_path, monkeypatch) -> None:
    out = FeaturesArtifact(Store(tmp_path).staging("features-0123456789"))
    out.create("val", 10, 2, 3, 4, "float16", 4)
    events: list[str] = []
    real_hash, real_mark = formats.sha256_file, FeaturesArtifact.mark_done
    monkeypatch.setattr(formats, "fsync_path", lambda path: events.append(str(path.relative_to(out.files.dir))))
    monkeypatch.setattr(formats, "sha256_file", lambda path, fsync=False: (
        events.append(f"{path.relative_to(out.files.dir)} fsync={fsync}"), real_hash(path, fsync))[1])
    monkeypatch.setattr(FeaturesArtifact, "mark_done", lambda self, *a: (events.append("marker"), real_mark(self, *a)))
    feats, keys = np.ones((4, 2, 2, 3), np.float16), np.full((4, 2, 2, 4), 2, np.float16)
    out.write_range("val", 4, 8, feats, keys)
    assert events[-1] == "marker" and events.count("marker") == 1
    shards = [f"val/{name}.zarr/c/1/0/0/0" for name in ("features", "keys")]  # the one Zarr shard of images 4-7
    for shard in shards:  # digested and flushed, then each new folder up to the artifact flushed
        assert {f"{shard} fsync=True", shard.rsplit("/", 1)[0], shard.split("/c/")[0] + "/c", "."} <= set(events)
    assert out.range_done("val", 4, 8) and out.missing("val", 10) == [(0, 4), (8, 10)]
    np.testing.assert_array_equal(out.features("val")[4:8], feats)
    np.testing.assert_array_equal(out.keys("val")[4:8], keys)

    # Another process publishes: it learns the digests from the markers, and reads no shard again.
    publisher = FeaturesArtifact(Store(tmp_path).staging_files("features-0123456789"))
    publisher.clear_progress()
    for shard in shards:
        st = (out.files.dir / shard).stat()
        assert publisher.files.known_digest(shard, st) == real_hash(out.files.dir / shard)
    assert not (out.files.dir / ".done").exists()


# ------------------------------------------------------------------------------------- runs in other processes
@pytest.fixture(scope="module")
def source(tmp_path_factory, prefect_harness) -> Path:
    """A store holding the data and teacher artifacts of the tiny world."""
    root = tmp_path_factory.mktemp("staging") / "source"
    execute(tiny_config(), ["data", "teacher"], None, str(root))
    return root


def _start_features(root: Path, log: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """``clips4 run --stages features`` in a child process, talking to the test harness's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    args = [sys.executable, "-m", "clips4.flows.cli", "run", "--stages", "features", "--store", str(root),
            *tiny_cli("features.shard_size=1", "features.batch_size=1", *extra)]
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


@pytest.mark.slow
def test_a_failed_shard_write_fails_the_stage_and_a_rerun_redoes_only_that_shard(source, tmp_path, monkeypatch) -> None:
    """Shards are written behind the teacher in a thread: its error must fail the run, leave no marker for the
    shard it lost and publish nothing, while the shards written before it stay done."""
    root = Path(shutil.copytree(source, tmp_path / "store"))
    cfg = tiny_config()  # shards of 8: train 0-8, 8-16, 16-24, val 0-8
    real_write = FeaturesArtifact.write_range

    def disk_full_once(self, split, lo, hi, *arrays) -> None:
        if (split, lo) == ("train", 8) and not written.get("failed"):
            written["failed"] = True
            raise OSError(28, "No space left on device")
        written[(split, lo)] = written.get((split, lo), 0) + 1
        real_write(self, split, lo, hi, *arrays)

    written: dict = {}
    monkeypatch.setattr(FeaturesArtifact, "write_range", disk_full_once)
    monkeypatch.setattr(features.features_shard, "retry_delay_seconds", 0)
    with pytest.raises(OSError, match="No space left"):
        execute(cfg, ["features"], None, str(root))
    assert not Store(root).list("features")
    (staging,) = (root / ".staging").glob("features-*")
    done = {m.name for m in (staging / ".done").iterdir()}
    assert "train-0-8" in done and "train-8-16" not in done

    (result,) = execute(cfg, ["features"], None, str(root))
    assert written[("train", 0)] == 1 and written[("train", 8)] == 1, "the rerun recomputed a finished shard"
    clean = Path(shutil.copytree(source, tmp_path / "clean"))
    (reference,) = execute(cfg, ["features"], None, str(clean))
    a, b = FeaturesArtifact.open(Store(root), result.key), FeaturesArtifact.open(Store(clean), reference.key)
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(a.features(split)[:]), np.asarray(b.features(split)[:]))
