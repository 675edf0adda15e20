"""The features stage after a crash: finished shards are kept as they are, the rest is redone, and the result
equals an uninterrupted run, also when the resumed run uses another shard size."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clips4.flows.pipeline import execute
from clips4.tasks.readers import FeaturesArtifact
from clips4.storage import Store
from conftest import tiny_cli, tiny_config

pytestmark = pytest.mark.slow


ONE_IMAGE_SHARDS = ("features.shard_size=1", "features.batch_size=1")


def _shard_files(folder: Path) -> dict[str, int]:
    files = (p for p in folder.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(folder)))
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files}


def test_killed_features_stage_resumes_without_recomputing(tmp_path, prefect_harness) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cfg = tiny_config(*ONE_IMAGE_SHARDS)
    for root in (killed, clean):
        execute(cfg, ["data", "teacher"], None, str(root))

    args = [sys.executable, "-m", "clips4.flows.cli", "run", *tiny_cli(*ONE_IMAGE_SHARDS), "--stages", "features",
            "--store", str(killed)]
    from prefect.settings import PREFECT_API_URL

    # The killed run talks to the test harness's server rather than starting (and waiting for) one of its own.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "run.log"
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    markers: list[Path] = []
    while len(markers) < 3:
        assert proc.poll() is None, f"the features run ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no shard finished in time"
        markers = list((killed / ".staging").glob("features-*/.done/*"))
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staging = markers[0].parent.parent
    done = {m.name for m in staging.glob(".done/*")}
    total = 24 + 8
    assert 3 <= len(done) < total, "the kill should land mid-way"
    before = _shard_files(staging)
    assert not Store(killed).list("features")

    (resumed,) = execute(cfg, ["features"], None, str(killed))
    (reference,) = execute(cfg, ["features"], None, str(clean))
    assert resumed.key == reference.key
    final = Store(killed).path(resumed.key)
    after = _shard_files(final)
    def marker(name: str) -> str:  # shard size 1: chunk i of train is images [i, i + 1)
        i = int(name.split("/c/")[1].split("/")[0])
        return f"train-{i}-{i + 1}"

    kept = [name for name in before if name.startswith("train/") and marker(name) in done]
    assert kept and all(after[name] == before[name] for name in kept), "finished shards were recomputed"
    a, b = FeaturesArtifact.open(Store(killed), resumed.key), FeaturesArtifact.open(Store(clean), reference.key)
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(a.features(split)[:]), np.asarray(b.features(split)[:]))
    np.testing.assert_array_equal(np.asarray(a.keys("val")[:]), np.asarray(b.keys("val")[:]))
    assert a.keys("train") is None and b.keys("train") is None  # no stage reads the train split's keys


def test_a_run_killed_and_resumed_with_another_shard_size_equals_a_clean_run(tmp_path, prefect_harness, caplog) -> None:
    """Markers of 4-image shards must not pass for 8-image ones: the resumed run starts the staged arrays over (their
    Zarr shard layout differs) instead of publishing the images it never computed as zeros."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    first = tiny_cli("features.shard_size=4", "features.batch_size=1")
    args = [sys.executable, "-m", "clips4.flows.cli", "run", *first, "--stages", "data,teacher,features",
            "--store", str(killed)]
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "run.log"
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not list((killed / ".staging").glob("features-*/.done/*")):
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no features shard finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Store(killed).list("features")

    cfg = tiny_config("features.shard_size=8")
    with caplog.at_level("WARNING", logger="clips4.tasks.features"):
        *_, resumed = execute(cfg, ["data", "teacher", "features"], None, str(killed))
    assert "starting over" in caplog.text
    # The clean run shares the killed run's data and teacher (teacher pre-training in another process may round
    # differently), and recomputes the features from nothing.
    shutil.copytree(killed, clean)
    (reference,) = execute(cfg, ["features"], "features", str(clean))
    assert resumed.key == reference.key and not resumed.reused and not reference.reused
    a, b = FeaturesArtifact.open(Store(killed), resumed.key), FeaturesArtifact.open(Store(clean), reference.key)
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(a.features(split)[:]), np.asarray(b.features(split)[:]))
    np.testing.assert_array_equal(np.asarray(a.keys("val")[:]), np.asarray(b.keys("val")[:]))
    assert a.keys("train") is None and b.keys("train") is None  # no stage reads the train split's keys
    assert not any((killed / ".staging").iterdir()), "the resumed run left staging debris"
