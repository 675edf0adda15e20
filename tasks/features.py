"""The features stage: MaskCLIP dense features of every image into Zarr, in shards mapped as Prefect tasks.

Work is split into shards of ``features.shard_size`` images. Each shard task writes only its own Zarr shard
(chunk = one image, shard = one unit of work, so no two writers touch one file) and then a marker file; a rerun
after a crash skips shards with a marker and redoes the rest. With ``features.dask_address`` the shards run on
that Dask cluster (prefect-dask; the store must be on a filesystem the workers share).
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from clips4.config import PipelineConfig
from clips4.data.io import prefetch, read_image
from clips4.data.prepare import resize_square
from clips4.data.records import Record
from clips4.device import resolve_device
from clips4.maskclip import DenseFeatures, extract_dense, prompt_templates, text_embeddings
from clips4.progress import track
from clips4.training import normalize_images, to_unit_images
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage, stage_key
from clips4.tasks.readers import CLASSES, TEACHER_INFO, DataArtifact, FeaturesArtifact, load_teacher


@lru_cache(maxsize=4)
def _records(store_root: str, key: str, split: str) -> tuple[Record, ...]:
    """A split's records, read once per worker process (each shard task needs its slice of them)."""
    return tuple(DataArtifact.open(Store(store_root), key).records(split))


@lru_cache(maxsize=2)
def _teacher(store_root: str, key: str, device: str):
    """One teacher per worker process and device, shared by the shard tasks that run there."""
    return load_teacher(Store(store_root).open(key), torch.device(device))


def teacher_dense(teacher, images: np.ndarray, batch_size: int, device: torch.device, amp: bool,
                  with_keys: bool) -> DenseFeatures:
    """MaskCLIP dense features (and keys) of uint8 images [B,H,W,3], normalised as the teacher expects."""
    cpu = torch.device("cpu")
    x = normalize_images(to_unit_images(images, cpu), torch.tensor(teacher.mean), torch.tensor(teacher.std))
    return extract_dense(teacher.model, x, batch_size, device, amp, with_keys)


def feature_grid(cfg: PipelineConfig, teacher) -> tuple[int, int, int | None]:
    """(side, D, key dim) of the dense map at ``features.resolution``, read off one dummy forward pass."""
    device = next(teacher.model.parameters()).device
    dummy = torch.zeros(1, 3, cfg.features.resolution, cfg.features.resolution, device=device)
    out = extract_dense(teacher.model, dummy, 1, device, amp=False, with_keys=cfg.features.keep_keys)
    keys = None if out.keys is None else out.keys.shape[-1]
    return out.features.shape[1], out.features.shape[-1], keys


@task(name="features-shard", retries=2, retry_delay_seconds=5)
def features_shard(cfg: PipelineConfig, store_root: str, key: str, upstream: dict[str, str], split: str, shard: int) -> str:
    """Compute one shard (idempotent: a shard with a done marker is skipped)."""
    f = cfg.features
    files = Store(store_root).staging(key)
    out = FeaturesArtifact(files)
    if out.shard_done(split, shard):
        return f"{split}/{shard}: reused"
    device = resolve_device(f.device)
    teacher = _teacher(store_root, upstream["teacher"], str(device))
    chunk = _records(store_root, upstream["data"], split)[shard * f.shard_size : (shard + 1) * f.shard_size]
    batches = [chunk[start : start + f.batch_size] for start in range(0, len(chunk), f.batch_size)]

    def load(batch: tuple[Record, ...]) -> np.ndarray:
        return np.stack([resize_square(read_image(r.image_path), f.resolution) for r in batch])

    # On a GPU the next batch is decoded while this one runs; on the CPU both would compete for the same cores.
    loaded = prefetch(load, batches) if device.type == "cuda" else map(load, batches)
    # The shard is gathered in memory and written once: a Zarr shard is one file, so writing it batch by batch
    # would re-read and re-write the whole file each time.
    feats, keys = [], []
    for images in track(loaded, f"features {split} shard {shard}", len(batches), unit="batch"):
        dense = teacher_dense(teacher, images, f.batch_size, device, f.amp, f.keep_keys)
        feats.append(dense.features.numpy().astype(f.dtype))
        if f.keep_keys:
            keys.append(dense.keys.numpy().astype(f.dtype))
    lo = shard * f.shard_size
    out.features(split, mode="r+")[lo : lo + len(chunk)] = np.concatenate(feats)
    if keys:
        out.keys(split, mode="r+")[lo : lo + len(chunk)] = np.concatenate(keys)
    out.mark_done(split, shard)
    return f"{split}/{shard}: computed"


def prepare_features(cfg: PipelineConfig, store: Store, key: str, upstream: dict[str, str], force: bool) -> list[tuple[str, int]]:
    """Create the (resumable) arrays in staging and list the shards still to do."""
    f = cfg.features
    files = store.staging(key, reset=force)
    teacher = _teacher(str(store.root), upstream["teacher"], "cpu")
    side, dim, key_dim = feature_grid(cfg, teacher)
    data = DataArtifact.open(store, upstream["data"])
    out = FeaturesArtifact(files)
    todo = []
    for split in data.splits:
        n = len(data.records(split))
        out.create(split, n, side, dim, key_dim if f.keep_keys else None, f.dtype, f.shard_size)
        todo += [(split, s) for s in range(-(-n // f.shard_size)) if not out.shard_done(split, s)]
    return todo


def finish_features(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    """Check every shard is done, then add the text embeddings of the dataset's class names."""
    data = DataArtifact.open(store, upstream["data"])
    out = FeaturesArtifact(files)
    for split in data.splits:
        n = len(data.records(split))
        missing = [s for s in range(-(-n // cfg.features.shard_size)) if not out.shard_done(split, s)]
        if missing:
            raise RuntimeError(f"features shards {missing} of split {split} did not finish; rerun the features stage")
    teacher = _teacher(str(store.root), upstream["teacher"], "cpu")
    classes = data.classes
    if classes.num_classes:
        with torch.no_grad():
            text = text_embeddings(teacher.model, teacher.tokenizer, classes.synonyms, prompt_templates(cfg.features.extra_templates))
        files.save_tensors("text.safetensors", {"text": text.float().cpu()})
    files.write_json(CLASSES, data.meta)
    files.write_json(TEACHER_INFO, store.open(upstream["teacher"]).read_json(TEACHER_INFO))
    out.clear_markers()
    shape = {s: list(out.features(s).shape) for s in data.splits}
    return {"shape": shape, "dtype": cfg.features.dtype}


def _task_runner(cfg: PipelineConfig):
    if cfg.features.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.features.dask_address)
    return ThreadPoolTaskRunner(max_workers=1)  # torch already uses every core


def features_stage(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Sub-flow of the pipeline: prepare, map shard tasks, then publish the artifact atomically."""

    @flow(name="features-shards", task_runner=_task_runner(cfg))
    def run_shards(todo: list[tuple[str, int]]) -> list[str]:
        futures = [features_shard.submit(cfg, store_root, key, upstream, split, shard) for split, shard in todo]
        return [fut.result() for fut in futures]

    store = Store(store_root)
    key = stage_key(cfg, "features", upstream)
    if store.exists(key) and not force:
        return run_stage(store, cfg, "features", upstream, lambda files: None)
    start = time.time()
    todo = prepare_features(cfg, store, key, upstream, force)
    if todo:
        run_shards(todo)
    result = run_stage(
        store, cfg, "features", upstream, lambda files: finish_features(cfg, store, upstream, files), force, reset_staging=False
    )
    result.seconds = round(time.time() - start, 2)
    return result
