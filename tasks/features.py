"""The features stage: MaskCLIP dense features of every image into Zarr, in shards mapped as Prefect tasks.

Work is split into shards of ``features.shard_size`` images. Each shard writes only its own Zarr shard
(chunk = one image, shard = one unit of work, so no two writers touch one file) and then a marker naming the image
range it wrote; a rerun after a crash skips ranges with a marker and redoes the rest. The run holds the key's lock
from the first touch of its staging folder to publication, and publishes only when markers cover every image.

Locally each shard is a Prefect task. With ``features.dask_address`` the shards are plain functions submitted to
that Dask cluster with dask.distributed, not Prefect tasks: a Prefect task on a Dask worker has to reach the
Prefect API, and the API of ``clips4 run`` lives inside the orchestrating process. The orchestrating flow logs each
shard as it finishes. Workers write into the store themselves, so the store must be a path on a filesystem every
worker shares, and every worker needs the same clips4 installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from functools import lru_cache

import numpy as np
import torch
from prefect import flow, get_run_logger, task
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

log = logging.getLogger(__name__)


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


SHARD_RETRIES = 2  # a shard that raises is run again this many times (locally and on Dask)
DASK_CONNECT_S = 30  # how long to try reaching the Dask scheduler
DASK_POLL_S = 5.0  # how often the wait for Dask shards checks that the cluster still has workers
DASK_NO_WORKERS_S = 120.0  # a Dask run with no worker connected for this long fails instead of waiting forever


def compute_shard(cfg: PipelineConfig, store_root: str, key: str, upstream: dict[str, str], split: str, lo: int,
                  hi: int) -> str:
    """Compute images [lo, hi) of a split, one Zarr shard (idempotent: a range with a done marker is skipped); a
    plain function so Dask can run it. It writes into the staging folder the orchestrating run created and holds
    the lock of, which it therefore neither creates nor resets."""
    f = cfg.features
    out = FeaturesArtifact(Store(store_root).staging_files(key))
    if out.range_done(split, lo, hi):
        return f"{split}/{lo}-{hi}: reused"
    device = resolve_device(f.device)
    teacher = _teacher(store_root, upstream["teacher"], str(device))
    chunk = _records(store_root, upstream["data"], split)[lo:hi]
    batches = [chunk[start : start + f.batch_size] for start in range(0, len(chunk), f.batch_size)]

    def load(batch: tuple[Record, ...]) -> np.ndarray:
        return np.stack([resize_square(read_image(r.image_path), f.resolution) for r in batch])

    # On a GPU the next batch is decoded while this one runs; on the CPU both would compete for the same cores.
    loaded = prefetch(load, batches) if device.type == "cuda" else map(load, batches)
    # The shard is gathered in memory and written once: a Zarr shard is one file, so writing it batch by batch
    # would re-read and re-write the whole file each time.
    feats, keys = [], []
    for images in track(loaded, f"features {split} images {lo}-{hi}", len(batches), unit="batch"):
        dense = teacher_dense(teacher, images, f.batch_size, device, f.amp, f.keep_keys)
        feats.append(dense.features.numpy().astype(f.dtype))
        if f.keep_keys:
            keys.append(dense.keys.numpy().astype(f.dtype))
    out.features(split, mode="r+")[lo:hi] = np.concatenate(feats)
    if keys:
        out.keys(split, mode="r+")[lo:hi] = np.concatenate(keys)
    out.mark_done(split, lo, hi)
    return f"{split}/{lo}-{hi}: computed"


features_shard = task(name="features-shard", retries=SHARD_RETRIES, retry_delay_seconds=5)(compute_shard)


def _dask_client(address: str):
    """A client of the scheduler at ``address``, or one error saying what to install or start."""
    try:
        from distributed import Client
    except ImportError:
        raise RuntimeError(
            "features.dask_address needs dask.distributed: pip install 'clips4[cluster]', or set it to null"
        ) from None
    try:
        return Client(address, timeout=DASK_CONNECT_S, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise RuntimeError(
            f"features.dask_address: no Dask scheduler answers at {address} ({err}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS`, or set features.dask_address to null"
        ) from None


def _check_workers_see(client, folder: str) -> None:
    """Fail before any work when a worker cannot see the store (it would write its shards elsewhere or nowhere)."""
    blind = sorted(worker for worker, ok in client.run(os.path.isdir, folder).items() if not ok)
    if blind:
        raise RuntimeError(
            f"Dask worker(s) {', '.join(blind)} do not see {folder}; the store must be on a filesystem every worker "
            "shares, under the same path"
        )


def _finished(client, futures: dict, address: str) -> Iterator[str]:
    """Each shard's message as it finishes. A shard that fails (an error, or workers dying under it more often
    than the scheduler's ``allowed-failures``) raises; so does a cluster left without workers for
    ``DASK_NO_WORKERS_S``: the wait is always bounded by progress, never by hope."""
    from distributed import wait
    from distributed.scheduler import KilledWorker

    pending = set(futures)
    no_workers_since: float | None = None
    while pending:
        try:
            with client.as_current():  # wait() finds its client there
                done, pending = wait(pending, timeout=DASK_POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        for fut in done:
            split, lo, hi = futures[fut]
            shard = f"{split}/{lo}-{hi}"
            try:
                yield fut.result()
            except KilledWorker:
                raise RuntimeError(
                    f"features shard {shard}: the Dask workers running it died repeatedly (out of memory? "
                    "see the workers' logs); finished shards are kept, rerun the features stage to do the rest"
                ) from None
            except CancelledError:
                raise RuntimeError(
                    f"features shard {shard} was dropped by the Dask scheduler at {address} (did it stop?); "
                    "finished shards are kept, rerun the features stage to do the rest"
                ) from None
            except Exception as err:
                raise RuntimeError(
                    f"features shard {shard} failed on the Dask cluster after {SHARD_RETRIES} retries: {err!r}"
                ) from err
        if done or client.nthreads():
            no_workers_since = None
        elif no_workers_since is None:
            no_workers_since = time.monotonic()
        elif time.monotonic() - no_workers_since > DASK_NO_WORKERS_S:
            raise RuntimeError(
                f"the Dask cluster at {address} has had no workers for {DASK_NO_WORKERS_S:.0f} s with {len(pending)} "
                "features shard(s) left; start workers (`dask worker ADDRESS`) and rerun the features stage"
            )


def shards_on_dask(cfg: PipelineConfig, store_root: str, key: str, upstream: dict[str, str],
                   todo: list[tuple[str, int, int]]) -> list[str]:
    """Run the shards on the Dask cluster at ``features.dask_address``; called from the orchestrating flow."""
    address = cfg.features.dask_address
    logger = get_run_logger()
    with _dask_client(address) as client:
        _check_workers_see(client, str(Store(store_root).staging_dir(key)))
        futures = {
            client.submit(
                compute_shard, cfg, store_root, key, upstream, split, lo, hi,
                key=f"features-shard-{split}-{lo}-{uuid.uuid4().hex[:8]}", pure=False, retries=SHARD_RETRIES,
            ): (split, lo, hi)
            for split, lo, hi in todo
        }
        logger.info("%d features shard(s) submitted to the Dask cluster at %s", len(futures), address)
        messages = []
        for message in track(_finished(client, futures, address), "features shards on Dask", len(futures), unit="shard"):
            logger.info(message)
            messages.append(message)
        return messages


def prepare_features(cfg: PipelineConfig, store: Store, key: str, upstream: dict[str, str]) -> list[tuple[str, int, int]]:
    """Create the (resumable) arrays in staging and list the image ranges (split, lo, hi) still to do.

    Call it holding the key's lock (:meth:`Store.building`). A Zarr array's shard size is fixed when it is made, so
    work staged in another layout (another ``features.shard_size``) is discarded: keeping it would leave units of
    work that straddle shard files. Otherwise every range the markers cover, whatever shard size wrote them, is
    kept, and only shards holding an uncovered image are scheduled, each aligned to its own Zarr shard.
    """
    f = cfg.features
    files = store.staging_files(key)
    teacher = _teacher(str(store.root), upstream["teacher"], "cpu")
    side, dim, key_dim = feature_grid(cfg, teacher)
    key_dim = key_dim if f.keep_keys else None
    data = DataArtifact.open(store, upstream["data"])
    sizes = {split: len(data.records(split)) for split in data.splits}
    units = {split: max(1, min(f.shard_size, n)) for split, n in sizes.items()}
    layout = {"dtype": f.dtype, "side": side, "dim": dim, "key_dim": key_dim,
              "splits": {split: {"images": sizes[split], "shard": units[split]} for split in data.splits}}
    out = FeaturesArtifact(files)
    if out.layout() != layout:
        if any(files.dir.iterdir()):
            log.warning("features: the work staged in %s was written in another layout (%s); starting over with %s",
                        files.dir, out.layout() or "not recorded", layout)
            out = FeaturesArtifact(store.staging(key, reset=True))
        for split in data.splits:
            out.create(split, sizes[split], side, dim, key_dim, f.dtype, units[split])
        out.record_layout(layout)
    todo = []
    for split in data.splits:
        gaps = out.missing(split, sizes[split])
        for lo in range(0, sizes[split], units[split]):
            hi = min(lo + units[split], sizes[split])
            if any(g_lo < hi and lo < g_hi for g_lo, g_hi in gaps):
                todo.append((split, lo, hi))
    return todo


def check_coverage(out: FeaturesArtifact, sizes: dict[str, int]) -> None:
    """Refuse to publish unless done markers cover every image of every split: an image no shard wrote is zeros."""
    for split, n in sizes.items():
        gaps = out.missing(split, n)
        if gaps:
            ranges = ", ".join(f"[{lo}, {hi})" for lo, hi in gaps)
            raise RuntimeError(
                f"features of images {ranges} of split {split} were never computed (no done marker covers them), so "
                "nothing was published; rerun the features stage to compute them"
            )


def finish_features(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    """Prove every image is computed, then add the text embeddings of the dataset's class names."""
    data = DataArtifact.open(store, upstream["data"])
    out = FeaturesArtifact(files)
    check_coverage(out, {split: len(data.records(split)) for split in data.splits})
    teacher = _teacher(str(store.root), upstream["teacher"], "cpu")
    classes = data.classes
    if classes.num_classes:
        with torch.no_grad():
            text = text_embeddings(teacher.model, teacher.tokenizer, classes.synonyms, prompt_templates(cfg.features.extra_templates))
        files.save_tensors("text.safetensors", {"text": text.float().cpu()})
    files.write_json(CLASSES, data.meta)
    files.write_json(TEACHER_INFO, store.open(upstream["teacher"]).read_json(TEACHER_INFO))
    out.clear_progress()
    shape = {s: list(out.features(s).shape) for s in data.splits}
    return {"shape": shape, "dtype": cfg.features.dtype}


def features_stage(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Sub-flow of the pipeline: prepare, map shard tasks, then publish the artifact atomically.

    The key's lock is held from the first touch of its staging folder to publication, so ``clips4 store gc`` and an
    identical run wait for this one instead of deleting or overwriting its work; ``force`` empties the folder only
    while holding it."""

    @flow(name="features-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))  # torch already uses every core
    def run_shards(todo: list[tuple[str, int, int]]) -> list[str]:
        if cfg.features.dask_address:
            return shards_on_dask(cfg, store_root, key, upstream, todo)
        futures = [features_shard.submit(cfg, store_root, key, upstream, *unit) for unit in todo]
        return [fut.result() for fut in futures]

    store = Store(store_root)
    key = stage_key(cfg, "features", upstream)
    if store.exists(key) and not force:
        return run_stage(store, cfg, "features", upstream, lambda files: None)
    start = time.time()
    with store.building(key, reset=force) as files:
        if store.exists(key) and not force:  # an identical run published it while this one waited for the lock
            shutil.rmtree(files.dir, ignore_errors=True)  # the empty folder the wait made, not anyone's work
            return run_stage(store, cfg, "features", upstream, lambda files: None)
        todo = prepare_features(cfg, store, key, upstream)
        if todo:
            run_shards(todo)
        result = run_stage(
            store, cfg, "features", upstream, lambda files: finish_features(cfg, store, upstream, files), force,
            reset_staging=False,
        )
    result.seconds = round(time.time() - start, 2)
    return result
