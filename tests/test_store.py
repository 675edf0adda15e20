"""The artifact store: keys, atomic publication under SIGKILL, racing writers, removal rules, manifests."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clips4.storage import Store, StoreError, make_key, validate_key


def test_keys_are_deterministic_and_validated() -> None:
    k = make_key("train", "abc", ["data-0123456789"], 1)
    assert k == make_key("train", "abc", ["data-0123456789"], 1)
    assert k != make_key("train", "abd", ["data-0123456789"], 1)
    assert k != make_key("train", "abc", ["data-0123456789"], 2)
    assert validate_key(k) == k
    for bad in ["../../etc", "/etc/passwd", "train-../x", "train-XYZ", "", "Train-0123456789", "train-0123456789/.."]:
        with pytest.raises(StoreError):
            validate_key(bad)


def test_root_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLIPS4_STORE", str(tmp_path / "env"))
    assert Store().root == (tmp_path / "env").resolve()
    assert Store(tmp_path / "flag").root == (tmp_path / "flag").resolve()


def test_produce_reuse_manifest_and_formats(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("data", "f", [], 1)
    calls = []

    def build(files):
        calls.append(1)
        files.write_json("info.json", {"n": 3})
        files.write_table("table", pd.DataFrame({"a": [1, 2]}), also=("csv", "md"))
        arr = files.create_array("x.zarr", (4, 2, 2), (1, 2, 2), "float16", shards=(2, 2, 2))
        arr[:] = np.ones((4, 2, 2))
        files.save_tensors("w.safetensors", {"w": torch.arange(3.0)})
        files.write_png("p.png", np.zeros((4, 4), np.uint8), palette=np.zeros((256, 3), np.uint8))
        return {"images": 3}

    m1, reused1 = st.produce("data", key, build, config={"x": 1}, upstream=[])
    m2, reused2 = st.produce("data", key, build, config={"x": 1}, upstream=[])
    assert (reused1, reused2) == (False, True) and len(calls) == 1
    m = st.manifest(key)
    assert m == m1 == m2
    assert m.summary == {"images": 3} and m.config == {"x": 1} and m.status == "complete"
    assert {"info.json", "table.parquet", "table.csv", "table.md", "w.safetensors", "p.png"} <= set(m.files)
    files = st.open(key)
    assert files.read_json("info.json") == {"n": 3}
    assert files.read_table("table")["a"].tolist() == [1, 2]
    assert files.open_array("x.zarr").dtype == np.float16
    assert torch.equal(files.load_tensors("w.safetensors")["w"], torch.arange(3.0))
    assert [x.key for x in st.list()] == [key] and st.list("train") == []
    with pytest.raises(ValueError, match="outside"):
        files.file("../escape.txt")


def test_uncompressed_arrays_store_raw_chunks_and_reopen(tmp_path) -> None:
    files = Store(tmp_path).staging(make_key("features", "f", [], 1))
    values = np.random.default_rng(0).standard_normal((4, 3, 3, 8)).astype(np.float16)
    for compress in (True, False):
        arr = files.create_array(f"{compress}.zarr", values.shape, (1, 3, 3, 8), "float16", (2, 3, 3, 8), compress)
        arr[:] = values
        assert (len(arr.compressors) > 0) == compress
        reopened = files.create_array(f"{compress}.zarr", values.shape, (1, 3, 3, 8), "float16", (2, 3, 3, 8), compress)
        np.testing.assert_array_equal(reopened[:], values)
    raw = sum(p.stat().st_size for p in (files.dir / "False.zarr" / "c").rglob("*") if p.is_file())
    assert raw >= values.nbytes


def test_failed_build_is_invisible_and_resumable(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("features", "f", [], 1)

    def broken(files):
        files.write_json("part.json", [1])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        st.produce("features", key, broken, config={}, upstream=[])
    assert not st.exists(key) and st.list() == []

    seen = []

    def resume(files):
        seen.append(files.has("part.json"))
        return None

    st.produce("features", key, resume, config={}, upstream=[])
    assert seen == [True] and st.exists(key)


def test_remove_refuses_downstream_and_cascades(tmp_path) -> None:
    st = Store(tmp_path)
    a = make_key("data", "a", [], 1)
    b = make_key("teacher", "b", [a], 1)
    st.produce("data", a, lambda f: None, config={}, upstream=[])
    st.produce("teacher", b, lambda f: None, config={}, upstream=[a])
    assert [m.key for m in st.lineage(b)] == [b, a]
    assert st.ancestor(b, "data") == a and st.ancestor(b, "teacher") == b and st.ancestor(b, "train") is None
    with pytest.raises(StoreError, match="--cascade"):
        st.remove(a)
    assert set(st.remove(a, cascade=True)) == {a, b}
    assert st.list() == []
    with pytest.raises(StoreError, match="no artifact"):
        st.manifest(a)


WRITER = textwrap.dedent(
    """
    import sys, time
    from clips4.storage import Store
    st = Store(sys.argv[1])
    def build(files):
        files.write_json("begun.json", 1)
        time.sleep(float(sys.argv[3]))
        files.write_json("done.json", 1)
        return {"writer": sys.argv[4]}
    st.produce("data", sys.argv[2], build, config={}, upstream=[])
    """
)


def _spawn(root: Path, key: str, sleep: float, name: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, str(sleep), name], env=env)


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_write_leaves_nothing_visible_and_gc_cleans(tmp_path, child_env) -> None:
    st = Store(tmp_path)
    key = make_key("data", "killed", [], 1)
    proc = _spawn(tmp_path, key, 60, "victim", child_env)
    _wait_for(tmp_path / ".staging" / key / "begun.json")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not st.exists(key) and st.list() == []
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    assert st.gc().skipped == [f".staging/{key}: modified 0 min ago"]  # a recent folder may be taken up again
    assert st.gc(older_than=0).removed == [f".staging/{key}"]
    assert not (tmp_path / ".staging" / key).exists()


def test_two_processes_racing_for_one_key(tmp_path, child_env) -> None:
    st = Store(tmp_path)
    key = make_key("data", "race", [], 1)
    first = _spawn(tmp_path, key, 1.5, "first", child_env)
    _wait_for(tmp_path / ".staging" / key / "begun.json")
    second = _spawn(tmp_path, key, 0, "second", child_env)
    assert first.wait(60) == 0 and second.wait(60) == 0
    # The second waited for the lock, found the artifact complete and reused it.
    assert st.manifest(key).summary == {"writer": "first"}
    assert st.gc(older_than=0).removed == []
