"""The synthetic world: determinism, honouring the config for any class names, captions, and idempotent writing."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from clips4.config import DataConfig, SyntheticConfig
from clips4.data.datasets import get_dataset
from clips4.data.synthetic import SHAPES, SyntheticWorld

CUSTOM = dict(
    seed=7,
    image_size=48,
    stuff=["lava", "moss field"],
    things=["apple", "umbrella", "drum", "traffic light", "owl"],
    min_things=1,
    max_things=2,
)


def _mentions(caption: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", caption) is not None


def test_same_seed_same_samples_other_seed_other_samples():
    a, b = SyntheticWorld(SyntheticConfig(seed=3)), SyntheticWorld(SyntheticConfig(seed=3))
    c = SyntheticWorld(SyntheticConfig(seed=4))
    for i in range(3):
        sa, sb, sc = a.sample("train", i), b.sample("train", i), c.sample("train", i)
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.label, sb.label)
        assert sa.caption == sb.caption
        assert not np.array_equal(sa.image, sc.image)
    assert not np.array_equal(a.sample("train", 0).image, a.sample("val", 0).image)
    assert np.array_equal(a.sample("test", 5).image, b.sample("test", 5).image)
    assert not np.array_equal(a.sample("test", 5).image, a.sample("val", 5).image)


def test_honours_config_and_captions_name_exactly_what_is_visible():
    cfg = SyntheticConfig(**CUSTOM)
    world = SyntheticWorld(cfg)
    assert world.class_names == [*cfg.stuff, *cfg.things]
    seen = np.zeros(len(world.class_names), dtype=bool)
    for i in range(60):
        s = world.sample("train", i)
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (48, 48) and s.label.dtype == np.uint8
        present = set(np.unique(s.label).tolist())
        assert present <= set(range(len(world.class_names)))
        assert 1 <= len(present & set(range(2, 7))) <= 2  # 1..max_things thing classes visible
        seen[list(present)] = True
        for cid, name in enumerate(world.class_names):
            assert _mentions(s.caption, name) == (cid in present), (s.caption, name, present)
    assert seen.all(), "every class should appear somewhere in 60 images"


def test_no_things_gives_stuff_only_captions():
    world = SyntheticWorld(SyntheticConfig(min_things=0, max_things=1))
    samples = [world.sample("val", i) for i in range(30)]
    stuff_only = [s for s in samples if s.label.max() < len(world.cfg.stuff)]
    assert stuff_only, "with min_things=0 some images should have no thing"
    assert all(not any(_mentions(s.caption, t) for t in world.cfg.things) for s in stuff_only)


def test_appearance_is_separable_and_does_not_depend_on_known_names():
    world = SyntheticWorld(SyntheticConfig(**CUSTOM))
    things = [a for a in world.appearances if a.is_thing]
    assert len({a.shape for a in things}) == len(things)  # distinct shapes while there are shapes left
    assert len({a.texture for a in things}) == len(things)
    hues = sorted(a.hue for a in world.appearances)
    gaps = np.diff([*hues, hues[0] + 1])
    assert np.allclose(gaps, 1 / len(hues))  # one evenly spread hue per class, stuff and things alike
    many = SyntheticWorld(SyntheticConfig(things=[f"thing{i}" for i in range(len(SHAPES) + 3)]))
    assert len({a.shape for a in many.appearances if a.is_thing}) == len(SHAPES)
    reseeded = SyntheticWorld(SyntheticConfig(**{**CUSTOM, "seed": 8}))
    assert [a.hue for a in reseeded.appearances] != [a.hue for a in world.appearances]


def test_class_identity_is_visible_in_pixel_colours():
    """A nearest-class-mean colour classifier already labels most pixels: the classes are learnable from images."""
    world = SyntheticWorld(SyntheticConfig(**CUSTOM))
    samples = [world.sample("train", i) for i in range(40)]
    pixels = np.concatenate([s.image.reshape(-1, 3) for s in samples]).astype(np.float32)
    labels = np.concatenate([s.label.ravel() for s in samples])
    means = np.stack([pixels[labels == k].mean(0) for k in range(len(world.class_names))])
    pred = ((pixels[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels).mean() > 0.75


def test_write_is_idempotent_and_round_trips(tmp_path, monkeypatch):
    world = SyntheticWorld(SyntheticConfig(**CUSTOM))
    records = world.write(tmp_path, "train", 5)
    assert [r.image_id for r in records] == [f"train_{i:05d}" for i in range(5)]
    for i, r in enumerate(records):
        s = world.sample("train", i)
        label = Image.open(r.label_path)
        assert label.mode == "L"
        assert np.array_equal(np.asarray(label), s.label)
        assert np.array_equal(np.asarray(Image.open(r.image_path).convert("RGB")), s.image)
        assert r.caption == s.caption and r.split == "train"
    stamps = [tmp_path.joinpath("images/train", f"{r.image_id}.png").stat().st_mtime_ns for r in records]

    def no_sampling(*args, **kwargs):
        raise AssertionError("existing files must not be regenerated")

    monkeypatch.setattr(SyntheticWorld, "sample", no_sampling)
    assert world.write(tmp_path, "train", 5) == records
    assert stamps == [tmp_path.joinpath("images/train", f"{r.image_id}.png").stat().st_mtime_ns for r in records]
    monkeypatch.undo()
    more = world.write(tmp_path, "train", 7)
    assert more[:5] == records and len(more) == 7
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_refuses_a_directory_of_another_world(tmp_path):
    SyntheticWorld(SyntheticConfig(seed=1)).write(tmp_path, "val", 2)
    with pytest.raises(ValueError, match="another configuration"):
        SyntheticWorld(SyntheticConfig(seed=2)).write(tmp_path, "val", 2)
    # the split sizes are not part of the world: a larger world with the same seed reuses the files
    assert len(SyntheticWorld(SyntheticConfig(seed=1, num_val=500)).write(tmp_path, "val", 3)) == 3


def _image_digests(records) -> list[str]:
    return [hashlib.sha256(np.asarray(Image.open(r.image_path)).tobytes()).hexdigest() for r in records]


def test_test_split_is_disjoint_and_leaves_train_and_val_unchanged(tmp_path):
    """The three splits: test exists, shares no image with train or val, and adding it changes neither of them."""
    def world(num_test: int, root):
        synthetic = SyntheticConfig(seed=0, image_size=32, num_train=6, num_val=4, num_test=num_test)
        splits = ["train", "val", "test"] if num_test else ["train", "val"]
        return get_dataset(DataConfig(dataset="synthetic", splits=splits, synthetic=synthetic), root=root)

    without, with_test = world(0, tmp_path / "two"), world(5, tmp_path / "three")
    test = with_test.records("test")
    assert len(test) == 5 and all(r.split == "test" and r.image_id.startswith("test_") for r in test)
    digests = {split: _image_digests(with_test.records(split)) for split in ("train", "val")}
    assert digests == {split: _image_digests(without.records(split)) for split in ("train", "val")}
    test_digests = _image_digests(test)
    assert len(set(test_digests)) == 5 and not set(test_digests) & {*digests["train"], *digests["val"]}
    teacher = SyntheticWorld(SyntheticConfig(seed=0, image_size=32))  # the teacher pre-trains on its own split
    assert not {hashlib.sha256(teacher.sample("teacher", i).image.tobytes()).hexdigest() for i in range(20)} & set(
        test_digests)
