"""Checks made before any stage runs, so a run that would fail late (after hours of data preparation) fails at once.

The checks read the config and the store only: the teacher resolves (without loading weights), the dataset root
and splits exist, the store is writable and has room for what the run will write. What the run will reuse or
build, the bytes each stage it builds will write, and anything it will do differently from what was asked, are
reported as notes.
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
from clips4.student import imagenet_weights_hint
from clips4.teacher import SCHEMA_PREFIXES, check_teacher_source, register_model_configs
from clips4.storage import Store, human_bytes
from clips4.tasks.common import plan_keys
from clips4.tasks.stages import STAGES, forced_stages
from clips4.tasks.readers import DataArtifact, keys_kept

FEATURE_BYTES = {"float16": 2, "float32": 4}
HEADROOM = 1.1  # free space must exceed the estimate by this factor (manifests, temporary files, pictures)


class PreflightError(ValueError):
    """The run cannot succeed as configured; the message names the thing and what to do."""


@dataclass(frozen=True)
class Estimate:
    """The bytes one stage will add to the store, and how they were counted (shown to the user)."""

    stage: str
    size: int
    how: str


@dataclass
class Preflight:
    """What the run will do: the stages it builds, the bytes each will add to the store, and notes for the user."""

    build: list[str]
    reuse: list[str]
    estimates: list[Estimate]
    free: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> int:
        return sum(e.size for e in self.estimates)

    def lines(self) -> list[str]:
        out = [f"plan: build {', '.join(self.build) or 'nothing'}; reuse {', '.join(self.reuse) or 'nothing'}"]
        if self.build:
            free = f" of {human_bytes(self.free)} free" if self.free is not None else ""
            out.append(f"estimated new storage: {human_bytes(self.estimate)}{free}")
            out += [f"  {e.stage} writes about {human_bytes(e.size)}: {e.how}" for e in self.estimates]
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


def _feature_grid(cfg: PipelineConfig) -> tuple[int, int, int | None] | None:
    """(cells per side, channels, key channels or None) of the teacher's dense map, from open_clip's model config;
    None when unknown. A ViT's keys are as wide as its blocks; a ResNet has none."""
    model = cfg.teacher.model
    if model.startswith(SCHEMA_PREFIXES):
        return None
    register_model_configs()
    model_cfg = open_clip.get_model_config(model.replace("/", "-"))
    if not model_cfg:
        return None
    vision = model_cfg.get("vision_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)):
        return cfg.features.resolution // 32, int(model_cfg.get("embed_dim", 512)), None
    stride = int(vision.get("patch_size", 16))
    return cfg.features.resolution // stride, int(model_cfg.get("embed_dim", 512)), int(vision.get("width", 768))


def estimate_bytes(cfg: PipelineConfig, build: list[str], counts: dict[str, int]) -> list[Estimate]:
    """Uncompressed size of the large arrays each stage in ``build`` writes (small files are covered by HEADROOM);
    a stage whose size is unknown (features of a model open_clip does not list) is left out."""
    out = []
    train = counts.get("train", 0)
    if "data" in build:
        side = cfg.data.train_resolution
        size = train * side * side * (3 + 4)  # uint8 RGB + int32 region ids
        how = f"{train} train images x {side}x{side} x (3 B RGB + 4 B region id)"
        if cfg.data.dataset == "synthetic":
            world = cfg.data.synthetic.image_size
            size += sum(counts.values()) * world * world * 4  # the world's PNGs and label maps (uncompressed bound)
            how += f" + {sum(counts.values())} world images and labels x {world}x{world} x 4 B"
        out.append(Estimate("data", size, how))
    if "teacher" in build and cfg.teacher.train == "synthetic":
        world = cfg.data.synthetic.image_size
        out.append(Estimate("teacher", cfg.teacher.num_images * world * world * 4 + 50 * 2**20,
                            f"{cfg.teacher.num_images} images x {world}x{world} x 4 B + 50 MiB of checkpoints"))
    grid = _feature_grid(cfg)
    if "features" in build and grid is not None:
        cells, dim, key_dim = grid
        f, images = cfg.features, sum(counts.values())
        item = FEATURE_BYTES[f.dtype]
        size = images * cells * cells * dim * item
        how = f"{images} images x {cells}x{cells} x {dim} x {item} B"
        keyed = sum(n for split, n in counts.items() if keys_kept(f, split))
        if key_dim and keyed:
            size += keyed * cells * cells * key_dim * item
            how += f" + keys of {keyed} images (all but train) x {cells}x{cells} x {key_dim} x {item} B"
        out.append(Estimate("features", size, how))
    return out


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
    if "evaluate" in chosen and cfg.evaluate.split == "train" and cfg.features.keep_keys:
        notes.append(
            "note: the features stage keeps no keys of the train split, so evaluate.split=train scores no "
            "maskclip+kspd row"
        )
    if "evaluate" in chosen and "train" not in chosen and not store.exists(keys["train"]):
        notes.append(
            f"note: the store holds no student for this config (train key {keys['train']}), so evaluate scores "
            "MaskCLIP alone; add train to the stages (or run the clips4-train flow first) for the clips4 rows"
        )
    random_resnet = cfg.train.student != "small_cnn" and cfg.train.backbone_weights is None
    if "train" in build and cfg.data.dataset != "synthetic" and random_resnet:
        notes.append(
            f"warning: the {cfg.train.student} student starts from random weights (train.backbone_weights is null); "
            f"{imagenet_weights_hint(cfg.train.student)}"
        )
    if not build:
        return Preflight(build, reuse, [], None, notes)
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
    estimates = estimate_bytes(cfg, build, counts)
    free = _free_bytes(store.root)
    _check_room(estimates, free, store.root)
    return Preflight(build, reuse, estimates, free, notes)


def _check_room(estimates: list[Estimate], free: int | None, root: Path) -> None:
    """Refuse at the first stage whose bytes, added to those of the stages before it, overflow the free space."""
    total = 0
    for e in estimates:
        total += e.size
        if free is not None and total * HEADROOM > free:
            earlier = f", {human_bytes(total)} with the stages before it" if total > e.size else ""
            raise PreflightError(
                f"stage {e.stage} writes about {human_bytes(e.size)} ({e.how}){earlier}, which with "
                f"{HEADROOM - 1:.0%} headroom is more than the {human_bytes(free)} free in the store {root}; free "
                "some space (clips4 store gc, clips4 store rm KEY) or pass --store PATH on a larger disk"
            )



def preflight_presets(
    cfgs: list[PipelineConfig], stages: list[str], force: str | None, store: Store
) -> list[Preflight]:
    """:func:`preflight` of each config, then room for all of them together: ``clips4 benchmark`` runs them one
    after another into one store."""
    plans = []
    for cfg in cfgs:
        try:
            plans.append(preflight(cfg, stages, force, store))
        except PreflightError as err:
            raise PreflightError(f"preset {cfg.name}: {err}") from None
    estimates = [Estimate(f"{cfg.name} {e.stage}", e.size, e.how) for cfg, p in zip(cfgs, plans) for e in p.estimates]
    if estimates:
        _check_room(estimates, _free_bytes(store.root), store.root)
    return plans
