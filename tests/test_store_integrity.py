"""The store notices damage and survives it: digests in manifests, verified reads, `store verify`, broken manifests,
gc that never leaves the root, durable publication, locks that re-enter and read-only stores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clips4.flows.cli import app
from clips4.storage import MANIFEST_FORMAT, Store, StoreError, make_key

runner = CliRunner()


def _build(files) -> dict:
    files.write_json("info.json", {"n": 3})
    files.save_tensors("w.safetensors", {"w": torch.arange(4.0)})
    arr = files.create_array("x.zarr", (4, 2, 2), (1, 2, 2), "float16", shards=(2, 2, 2))
    arr[:] = np.ones((4, 2, 2))
    return {}


def _artifact(root: Path, name: str = "a") -> tuple[Store, str]:
    st = Store(root)
    key = make_key("data", name, [], 1)
    st.produce("data", key, _build, config={}, upstream=[])
    return st, key


def _flip_byte(path: Path, offset: int = -2) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _verify_cli(root: Path, env: dict[str, str], *keys: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clips4.flows.cli", "store", "verify", *keys, "--store", str(root)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_manifest_records_sha256_of_every_file(tmp_path) -> None:
    st, key = _artifact(tmp_path)
    m = st.manifest(key)
    assert m.format == MANIFEST_FORMAT and m.verified
    folder = st.path(key)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(m.files) == on_disk and any(f.startswith("x.zarr/c/") for f in on_disk)
    for name, record in m.files.items():
        assert record.size == (folder / name).stat().st_size
        assert record.sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["format"] == MANIFEST_FORMAT and set(raw["files"]["info.json"]) == {"size", "sha256"}


def test_a_file_rewritten_after_its_writer_gets_its_real_digest(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("data", "rewritten", [], 1)

    def build(files):
        files.write_json("a.json", {"x": 1})
        files.file("a.json").write_text('{"x": 22}')  # same stage, direct write: the writer's digest is stale

    st.produce("data", key, build, config={}, upstream=[])
    assert st.open(key).read_json("a.json") == {"x": 22}


def test_flipped_byte_is_found_by_reads_and_by_verify(tmp_path, child_env) -> None:
    st, key = _artifact(tmp_path)
    assert _verify_cli(tmp_path, child_env).returncode == 0
    _flip_byte(st.path(key) / "info.json")
    _flip_byte(st.path(key) / "w.safetensors")

    files = st.open(key)
    with pytest.raises(StoreError) as raised:
        files.read_json("info.json")
    assert str(raised.value) == (
        f"artifact {key}: file info.json is damaged (sha256 differs from its manifest); "
        f"rebuild it with --force data or remove it with clips4 store rm {key}"
    )
    for read in (lambda: files.load_tensors("w.safetensors"), lambda: files.verified_path("w.safetensors")):
        with pytest.raises(StoreError, match="file w.safetensors is damaged"):
            read()

    out = _verify_cli(tmp_path, child_env, key)
    assert out.returncode == 1, out.stdout + out.stderr
    damaged = [line for line in out.stdout.splitlines() if line.startswith("damaged")]
    assert len(damaged) == 2 and all(key in line for line in damaged)
    assert any("info.json" in line for line in damaged) and any("w.safetensors" in line for line in damaged)


def test_missing_zarr_chunk_is_an_error_not_zeros(tmp_path, child_env) -> None:
    st, key = _artifact(tmp_path)
    assert st.open(key).open_array("x.zarr")[:].sum() == 16
    chunk = sorted((st.path(key) / "x.zarr" / "c").rglob("*"))[-1]
    assert chunk.is_file()
    chunk.unlink()
    rel = chunk.relative_to(st.path(key)).as_posix()
    with pytest.raises(StoreError, match=f"array x.zarr is missing its chunk file {rel}"):
        st.open(key).open_array("x.zarr")
    problems = st.verify()
    assert [(p.what, p.file) for p in problems] == [("missing", rel)] and problems[0].serious
    out = _verify_cli(tmp_path, child_env)
    assert out.returncode == 1 and rel in out.stdout


def test_verify_notes_unlisted_files_without_failing(tmp_path) -> None:
    st, key = _artifact(tmp_path)
    (st.path(key) / "extra.txt").write_text("x")
    problems = st.verify([key])
    assert [(p.what, p.file, p.serious) for p in problems] == [("unlisted", "extra.txt", False)]
    assert runner.invoke(app, ["store", "verify", key, "--store", str(tmp_path)]).exit_code == 0


def _write_manifest(st: Store, key: str, text: str) -> None:
    folder = st.path(key)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(text)


def test_broken_and_newer_manifests_are_listed_as_broken_and_removable(tmp_path) -> None:
    st, good = _artifact(tmp_path)
    bad_json = make_key("data", "bad", [], 1)
    newer = make_key("data", "newer", [], 1)
    lacking = make_key("teacher", "lacking", [good], 1)
    _write_manifest(st, bad_json, "{not json")
    future = json.loads((st.path(good) / "manifest.json").read_text()) | {"key": newer, "format": MANIFEST_FORMAT + 1}
    _write_manifest(st, newer, json.dumps(future))
    _write_manifest(st, lacking, json.dumps({"kind": "teacher", "key": lacking}))

    assert [m.key for m in st.list()] == [good]
    assert {b.key for b in st.broken()} == {bad_json, newer, lacking}
    assert not any(st.exists(k) for k in (bad_json, newer, lacking))
    assert st.downstream(good) == [] and st.lineage(lacking) == []

    listed = json.loads(runner.invoke(app, ["store", "ls", "--json", "--store", str(tmp_path)]).stdout)
    status = {r["key"]: (r["status"], r.get("reason", "")) for r in listed}
    assert status[good] == ("complete", "")
    assert status[bad_json][0] == status[newer][0] == status[lacking][0] == "broken"
    assert "not valid JSON" in status[bad_json][1] and "newer" in status[newer][1] and "lacks" in status[lacking][1]
    table = runner.invoke(app, ["store", "ls", "--store", str(tmp_path)])
    assert table.exit_code == 0 and "broken" in table.output

    shown = runner.invoke(app, ["store", "show", newer, "--store", str(tmp_path)])
    assert shown.exit_code != 0 and "broken" in shown.output and "upgrade clips4" in shown.output
    assert {p.key for p in st.verify() if p.what == "broken"} == {bad_json, newer, lacking}

    removed = runner.invoke(app, ["store", "rm", bad_json, "--store", str(tmp_path)])
    assert removed.exit_code == 0, removed.output
    assert not st.path(bad_json).exists() and {b.key for b in st.broken()} == {newer, lacking}


def test_a_build_replaces_a_broken_artifact(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("data", "rebuilt", [], 1)
    _write_manifest(st, key, "[]")
    manifest, reused = st.produce("data", key, _build, config={}, upstream=[])
    assert not reused and st.exists(key) and st.broken() == []
    assert st.manifest(key) == manifest


def test_old_format_manifests_still_read_unverified(tmp_path) -> None:
    st, key = _artifact(tmp_path)
    path = st.path(key) / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["format"]
    raw["files"] = {name: record["size"] for name, record in raw["files"].items()}
    path.write_text(json.dumps(raw))

    m = st.manifest(key)
    assert m.format == 1 and not m.verified and m.size == sum(raw["files"].values())
    files = st.open(key)
    assert files.read_json("info.json") == {"n": 3} and files.open_array("x.zarr").shape == (4, 2, 2)
    assert [(p.what, p.serious) for p in st.verify()] == [("unverified", False)]
    (st.path(key) / "info.json").write_text('{"n": 33}')  # a size change is still caught
    with pytest.raises(StoreError, match="size differs"):
        st.open(key).read_json("info.json")
    shown = runner.invoke(app, ["store", "show", key, "--store", str(tmp_path)])
    assert shown.exit_code == 0 and "unverified" in shown.output


# ----------------------------------------------------------------------------------------------------------- gc
def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "data-0123456789").mkdir(parents=True)
    (outside / "data-0123456789" / "precious.txt").write_text("keep me")
    (outside / "file.txt").write_text("keep me too")
    return outside


def _age(path: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)


def test_gc_never_follows_symlinked_staging_or_trash(tmp_path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "store"
    root.mkdir()
    (root / ".staging").symlink_to(outside, target_is_directory=True)
    (root / ".trash").symlink_to(outside, target_is_directory=True)
    report = Store(root).gc(older_than=0)
    assert report.removed == [] and report.failed == [] and len(report.skipped) == 2
    assert (outside / "data-0123456789" / "precious.txt").read_text() == "keep me"
    assert (outside / "file.txt").exists()
    gc = runner.invoke(app, ["store", "gc", "--older-than", "0", "--store", str(root)])
    assert gc.exit_code == 0 and "removed 0 item(s)" in gc.output and "symbolic link" in gc.output


def test_gc_unlinks_links_inside_staging_and_trash_without_touching_targets(tmp_path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "store"
    (root / ".staging").mkdir(parents=True)
    (root / ".trash").mkdir()
    (root / ".staging" / "data-0123456789").symlink_to(outside / "data-0123456789", target_is_directory=True)
    (root / ".trash" / "gone").symlink_to(outside, target_is_directory=True)
    (root / ".trash" / "real").mkdir()
    (root / ".trash" / "real" / "f").write_text("x")
    report = Store(root).gc(older_than=0)
    assert sorted(report.removed) == [".staging/data-0123456789", ".trash/gone", ".trash/real"]
    assert not any(os.path.lexists(root / a / n) for a, n in [(".staging", "data-0123456789"), (".trash", "gone")])
    assert (outside / "data-0123456789" / "precious.txt").read_text() == "keep me"
    assert (outside / "file.txt").exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from clips4.storage import Store
    st = Store(sys.argv[1])
    with st.building(sys.argv[2]):
        Path(sys.argv[3]).write_text("held")
        time.sleep(60)
    """
)


@pytest.mark.timeout(120)
def test_gc_leaves_locked_and_recent_staging(tmp_path, child_env) -> None:
    st = Store(tmp_path)
    held, recent, stale = (make_key("features", n, [], 1) for n in ("held", "recent", "stale"))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), held, str(ready)], env=child_env)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert time.time() < deadline and proc.poll() is None, "the lock holder never started"
            time.sleep(0.05)
        for key in (held, recent, stale):
            st.staging(key).write_json("part.json", 1)
        _age(st.staging_dir(held))
        _age(st.staging_dir(stale))
        report = st.gc()
        assert report.removed == [f".staging/{stale}"] and report.failed == []
        assert sorted(report.skipped) == sorted([f".staging/{held}: being built (its lock is held)",
                                                  f".staging/{recent}: modified 0 min ago"])
        assert st.staging_dir(held).is_dir() and st.staging_dir(recent).is_dir()
        assert st.gc(older_than=0).removed == [f".staging/{recent}"]
        assert st.staging_dir(held).is_dir()
    finally:
        proc.kill()
        proc.wait()


def test_gc_reports_only_what_is_really_gone(tmp_path, monkeypatch) -> None:
    st = Store(tmp_path)
    for name in ("a", "b"):
        (tmp_path / ".trash" / name).mkdir(parents=True)
    calls = []

    def stubborn(path, *args, **kwargs):
        calls.append(Path(path).name)
        if Path(path).name == "a":
            raise PermissionError(13, "Permission denied", str(path))
        # "b": returns without deleting anything

    monkeypatch.setattr("clips4.storage.store.shutil.rmtree", stubborn)
    report = st.gc()
    assert calls == ["a", "b"] and report.removed == []
    assert report.failed == ["could not remove .trash/a: Permission denied", "could not remove .trash/b: it is still there"]
    gc = runner.invoke(app, ["store", "gc", "--store", str(tmp_path)])
    assert gc.exit_code == 1 and "could not remove .trash/a" in gc.output


def test_gc_older_than_parses_durations() -> None:
    from clips4.flows.cli import parse_duration

    assert [parse_duration(t) for t in ("0", "45s", "30m", "2h", "1d", "1.5h")] == [0, 45, 1800, 7200, 86400, 5400]
    assert runner.invoke(app, ["store", "gc", "--older-than", "soon"]).exit_code != 0


# ------------------------------------------------------------------------------------------- durable publish
def test_publish_fsyncs_files_and_folders_before_the_manifest_and_the_rename(tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    st, key = _artifact(tmp_path)
    staging, final = str(st.staging_dir(key)), str(st.path(key))
    files = [f"{staging}/{name}" for name in st.manifest(key).files]
    assert set(files) <= set(synced) and len(synced) == len(set(synced)), "one fsync per file"
    manifest_at = synced.index(f"{staging}/manifest.json")
    assert max(synced.index(f) for f in files) < manifest_at < synced.index(staging)
    assert synced[-1] == str(Path(final).parent)


# ------------------------------------------------------------------------------------- locks and read-only stores
@pytest.mark.timeout(30)
def test_produce_inside_building_does_not_wait_for_itself(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("features", "reentrant", [], 1)
    results = []
    with st.building(key) as files:
        files.write_json("part.json", 1)
        worker = threading.Thread(
            target=lambda: results.append(st.produce("features", key, lambda f: None, config={}, upstream=[],
                                                     reset_staging=False)[1])
        )
        worker.start()
        worker.join(20)
        assert results == [False], "produce from another thread of the building process must not wait"
        assert st.produce("features", key, lambda f: None, config={}, upstream=[]) == (st.manifest(key), True)
        assert "part.json" in st.manifest(key).files
    assert not st.staging_dir(key).exists()


def test_staging_files_neither_creates_nor_resets(tmp_path) -> None:
    st = Store(tmp_path)
    key = make_key("features", "helpers", [], 1)
    with pytest.raises(StoreError, match="does not exist"):
        st.staging_files(key)
    assert not st.staging_dir(key).exists()
    with st.building(key) as files:
        files.write_json("mine.json", 1)
        assert st.staging_files(key).read_json("mine.json") == 1


def test_complete_read_only_store_is_readable_and_refuses_builds(tmp_path) -> None:
    st, key = _artifact(tmp_path)
    shutil.rmtree(tmp_path / ".locks")
    (tmp_path / ".locks").write_text("not a folder: stands in for a read-only file system")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    manifest, reused = st.produce("data", key, _build, config={}, upstream=[])
    assert reused and manifest == st.manifest(key)
    assert st.open(key).read_json("info.json") == {"n": 3}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    missing = make_key("data", "missing", [], 1)
    with pytest.raises(StoreError, match=r"is read-only: .*pass --store PATH to a writable store"):
        st.produce("data", missing, _build, config={}, upstream=[])


def test_remove_turns_os_errors_into_store_errors(tmp_path, monkeypatch) -> None:
    st, key = _artifact(tmp_path)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr("clips4.storage.store.os.rename", refuse)
    with pytest.raises(StoreError, match=f"cannot remove {st.path(key)}: Permission denied"):
        st.remove(key)
