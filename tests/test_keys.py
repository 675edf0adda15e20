"""Keys follow content: a dataset root by its listing, weight files named by path by their bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clips4.tasks.common as common
from clips4.tasks.common import plan_keys
from conftest import tiny_config


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch) -> Path:
    """Each test hashes into its own cache file, never the user's."""
    path = tmp_path / "cache" / "file-sha256.json"
    monkeypatch.setattr(common, "HASH_CACHE", path)
    return path


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _data_key(root: Path) -> str:
    cfg = tiny_config("data.dataset=imagefolder", f"data.root={root}")
    return plan_keys(cfg, ["data"])["data"]


def _set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, ns=(path.stat().st_atime_ns, seconds * 10**9))


def test_the_data_key_follows_the_images_under_the_root(tmp_path) -> None:
    root = tmp_path / "images"
    for i in range(3):
        _png(root / "sub" / f"{i}.png", i)
        _set_mtime(root / "sub" / f"{i}.png", 1_000_000)
    first = _data_key(root)
    assert _data_key(root) == first, "an unchanged root must keep its key"

    _png(root / ".thumbs" / "x.png", 9)
    _png(root / ".hidden.png", 9)
    assert _data_key(root) == first, "hidden files and folders are not part of the dataset"

    _png(root / "3.png", 3)
    added = _data_key(root)
    assert added != first, "an added image must change the key"

    (root / "3.png").unlink()
    assert _data_key(root) == first, "removing it again must give the first key back"

    image = root / "sub" / "0.png"
    _set_mtime(image, 1_000_001)
    touched = _data_key(root)
    assert touched not in (first, added), "a touched image must change the key"

    _png(image, 200)
    _set_mtime(image, 1_000_002)
    assert _data_key(root) not in (first, added, touched), "a replaced image must change the key"


def test_the_synthetic_world_has_no_listing(monkeypatch) -> None:
    cfg = tiny_config()
    monkeypatch.setattr(common, "listing_fingerprint", lambda root: pytest.fail("the synthetic world was listed"))
    assert common.content_identity(cfg, "data") == {}
    assert plan_keys(cfg, ["data"])["data"].startswith("data-")


def _ckpt(path: Path, payload: bytes) -> Path:
    path.write_bytes(b"PK\x03\x04" + payload)
    return path


def test_a_teacher_checkpoint_is_keyed_by_its_bytes(tmp_path, hash_cache) -> None:
    ckpt = _ckpt(tmp_path / "teacher.pt", b"first weights")
    cfg = tiny_config("teacher.train=none", "teacher.model=RN50", f"teacher.pretrained={ckpt}")
    first = plan_keys(cfg, ["features"])
    assert plan_keys(cfg, ["features"]) == first

    _ckpt(ckpt, b"other weights")  # same path, other bytes
    second = plan_keys(cfg, ["features"])
    assert second["teacher"] != first["teacher"] and second["features"] != first["features"]
    assert second["data"] == first["data"]
    assert str(ckpt.resolve()) in hash_cache.read_text()


def test_a_hashed_file_is_read_once_while_its_size_and_mtime_stay(tmp_path, monkeypatch) -> None:
    weights = _ckpt(tmp_path / "w.pt", b"x" * 100)
    digest = common.file_sha256(weights)
    real_open = Path.open

    def guarded_open(self: Path, *args, **kwargs):
        assert self != weights.resolve(), "a cached file was read again"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)
    assert common.file_sha256(weights) == digest
    monkeypatch.undo()
    _ckpt(weights, b"y" * 100)  # same size; a new mtime
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert common.file_sha256(weights) != digest, "a changed file must be hashed again"


def test_student_backbone_weights_are_keyed_by_their_bytes(tmp_path) -> None:
    weights = _ckpt(tmp_path / "resnet50.pth", b"a")
    cfg = tiny_config("train.student=resnet50", f"train.backbone_weights={weights}")
    first = plan_keys(cfg, ["train"])
    _ckpt(weights, b"b")
    second = plan_keys(cfg, ["train"])
    assert second["train"] != first["train"] and second["cluster"] == first["cluster"]


def test_a_missing_weights_file_still_has_a_key(tmp_path) -> None:
    cfg = tiny_config("teacher.train=none", f"teacher.pretrained={tmp_path / 'gone.pt'}")
    assert common.content_identity(cfg, "teacher") == {"teacher.pretrained": "missing"}
