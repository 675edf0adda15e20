"""Checks made before any stage runs, so a run that would fail late (after hours of data preparation) fails at once.

The checks read the config and the store only: the teacher resolves (without loading weights), the dataset root
and splits exist, the store is writable and has room for what the run will write. What the run will reuse or
build, and anything it will do differently from what was asked, is reported as notes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import open_clip

from clips4.config import PipelineConfig
from clips4.data.datasets import DatasetError, get_dataset
from clips4.prototypes import load_faiss
from clips4.teacher import SCHEMA_PREFIXES, check_teacher_source, register_model_configs
from clips4.storage import Store, human_bytes
from clips4.tasks.common import plan_keys
from clips4.tasks.stages import STAGES, forced_stages
from clips4.tasks.readers import DataArtifact

FEATURE_BYTES = {"float16": 2, "float32": 4}
HEADROOM = 1.1  # free space must exceed the estimate by this factor (manifests, temporary files, pictures)


class PreflightError(ValueError):
    """The run cannot succeed as configured; the message names the thing and what to do."""


@dataclass
class Preflight:
    """What the run will do: the stages it builds, the bytes they will add to the store, and notes for the user."""

    build: list[str]
    reuse: list[str]
    estimate: int
    free: int | None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"plan: build {', '.join(self.build) or 'nothing'}; reuse {', '.join(self.reuse) or 'nothing'}"]
        if self.build:
            free = f" of {human_bytes(self.free)} free" if self.free is not None else ""
            out.append(f"estimated new storage: {human_bytes(self.estimate)}{free}")
        return out + self.notes


def check_force(force: str | None) -> None:
    if force is not None and force not in STAGES:
        raise PreflightError(f"force must be one of {', '.join(STAGES)} (got {force!r})")


def check_stages(stages: list[str]) -> None:
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise PreflightError(f"unknown stage(s) {', '.join(map(repr, bad)) or '(none given)'}; stages are {', '.join(STAGES)}")


def _image_counts(cfg: PipelineConfig, store: Store, data_key: str) -> dict[str, int]:
    """Images per split: from the stored data artifact, the synthetic world's config, or a listing of the dataset."""
    if store.exists(data_key):
        table = DataArtifact.open(store, data_key).table
        return {str(k): int(v) for k, v in table.groupby("split").size().items()}
    d = cfg.data
    if d.dataset == "synthetic":
        sizes = {"train": d.synthetic.num_train, "val": d.synthetic.num_val, "test": d.synthetic.num_test}
        return {s: min(sizes.get(s, 0), d.max_images or sizes.get(s, 0)) for s in d.splits}
    try:
        dataset = get_dataset(d)
        return {s: len(dataset.records(s)) for s in d.splits}
    except (DatasetError, ValueError, OSError) as err:  # a missing root, an unknown class name, an unreadable list
        raise PreflightError(str(err)) from None


def _feature_grid(cfg: PipelineConfig) -> tuple[int, int] | None:
    """(cells per side, channels) of the teacher's dense map, from open_clip's model config; None when unknown."""
    model = cfg.teacher.model
    if model.startswith(SCHEMA_PREFIXES):
        return None
    register_model_configs()
    model_cfg = open_clip.get_model_config(model.replace("/", "-"))
    if not model_cfg:
        return None
    vision = model_cfg.get("vision_cfg", {})
    stride = 32 if isinstance(vision.get("layers"), (list, tuple)) else int(vision.get("patch_size", 16))
    return cfg.features.resolution // stride, int(model_cfg.get("embed_dim", 512))


def estimate_bytes(cfg: PipelineConfig, build: list[str], counts: dict[str, int]) -> int:
    """Uncompressed size of the large arrays the stages in ``build`` write (small files are covered by HEADROOM)."""
    total = 0
    train = counts.get("train", 0)
    if "data" in build:
        side = cfg.data.train_resolution
        total += train * side * side * (3 + 4)  # uint8 RGB + int32 region ids
        if cfg.data.dataset == "synthetic":
            world = cfg.data.synthetic.image_size
            total += sum(counts.values()) * world * world * 4  # the world's PNGs and label maps (uncompressed bound)
    if "teacher" in build and cfg.teacher.train == "synthetic":
        world = cfg.data.synthetic.image_size
        total += cfg.teacher.num_images * world * world * 4 + 50 * 2**20  # its images plus checkpoints
    grid = _feature_grid(cfg)
    if "features" in build and grid is not None:
        cells, dim = grid
        per_image = cells * cells * dim * FEATURE_BYTES[cfg.features.dtype] * (2 if cfg.features.keep_keys else 1)
        total += sum(counts.values()) * per_image
    return total


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".preflight-"):
            pass
    except OSError as err:
        raise PreflightError(
            f"the store {root} is not writable ({err.strerror or err}); pass --store PATH or set CLIPS4_STORE to a "
            "writable folder"
        ) from None


def _free_bytes(root: Path) -> int | None:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def preflight(cfg: PipelineConfig, stages: list[str], force: str | None, store: Store) -> Preflight:
    """Check what can fail late before anything runs; raise :class:`PreflightError` with one clear message."""
    check_stages(stages)
    check_force(force)
    chosen = [s for s in STAGES if s in stages]
    keys = plan_keys(cfg, chosen)
    forced = forced_stages(force)
    build = [s for s in chosen if s in forced or not store.exists(keys[s])]
    reuse = [s for s in chosen if s not in build]
    notes: list[str] = []
    if "evaluate" in chosen and "train" not in chosen and not store.exists(keys["train"]):
        notes.append(
            f"note: the store holds no student for this config (train key {keys['train']}), so evaluate scores "
            "MaskCLIP alone; add train to the stages (or run the clips4-train flow first) for the clips4 rows"
        )
    if not build:
        return Preflight(build, reuse, 0, None, notes)
    if "teacher" in build and cfg.teacher.train == "none":
        try:
            check_teacher_source(cfg.teacher.model, cfg.teacher.pretrained)
        except Exception as err:  # TeacherLoadError and friends: already one sentence with the fix
            raise PreflightError(str(err)) from None
    if "cluster" in build:
        try:
            load_faiss()
        except RuntimeError as err:
            raise PreflightError(str(err)) from None
    counts = _image_counts(cfg, store, keys.get("data") or plan_keys(cfg, ["data"])["data"])
    missing = [s for s in cfg.data.splits if not counts.get(s)]
    if "data" in build and missing:
        raise PreflightError(
            f"dataset {cfg.data.dataset} has no images in split(s) {', '.join(missing)} under {cfg.data.root}; "
            "fix data.root or data.splits"
        )
    _check_writable(store.root)
    estimate = estimate_bytes(cfg, build, counts)
    free = _free_bytes(store.root)
    if free is not None and estimate * HEADROOM > free:
        raise PreflightError(
            f"the store {store.root} has {human_bytes(free)} free but this run writes about {human_bytes(estimate)}; "
            "free some space (clips4 store gc, clips4 store rm KEY) or pass --store PATH on a larger disk"
        )
    return Preflight(build, reuse, estimate, free, notes)

