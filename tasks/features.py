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
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import ExitStack
from functools import lru_cache

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from clips4.config import PipelineConfig
from clips4.data.prepare import read_square_batch
from clips4.data.records import Record
from clips4.device import resolve_device
from clips4.maskclip import DenseFeatures, extract_dense, prompt_templates, text_embeddings
from clips4.overlap import WorkAhead, WriteBehind
from clips4.progress import track
from clips4.data.prepare import normalize_images, to_unit_images
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage, stage_key
from clips4.tasks.readers import CLASSES, TEACHER_INFO, DataArtifact, FeaturesArtifact, keys_kept, load_teacher

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
    """MaskCLIP dense features (and keys) of uint8 images [B,H,W,3], normalised as the teacher expects on ``device``
    (a quarter of the bytes to move there, and the host's cores stay free for decoding)."""
    mean, std = (torch.tensor(v, device=device) for v in (teacher.mean, teacher.std))
    x = normalize_images(to_unit_images(images, device), mean, std)
    return extract_dense(teacher.model, x, batch_size, device, amp, with_keys)


def feature_grid(cfg: PipelineConfig, teacher) -> tuple[int, int, int | None]:
    """(side, D, key dim) of the dense map at ``features.resolution``, read off one dummy forward pass."""
    device = next(teacher.model.parameters()).device
    dummy = torch.zeros(1, 3, cfg.features.resolution, cfg.features.resolution, device=device)
    out = extract_dense(teacher.model, dummy, 1, device, amp=False, with_keys=cfg.features.keep_keys)
    keys = None if out.keys is None else out.keys.shape[-1]
    return out.features.shape[1], out.features.shape[-1], keys


SHARD_RETRIES = 2  # a shard that raises is run again this many times (locally and on Dask)
AHEAD_PER_WORKER = 2  # batches decoded ahead of the teacher per image worker: no worker idles, memory stays bounded
# Threads writing finished shards: writing, digesting and flushing 800 kB an image (ViT-B/16 at 448 px) takes one
# thread about as long as a GPU takes to extract it, so a second one keeps the writes off the critical path.
WRITERS = 2
SHARDS_DONE = "features: %d images in %d shard(s) in %.2f s, %.1f img/s (the last shard still being written)"
DASK_CONNECT_S = 30  # how long to try reaching the Dask scheduler
DASK_POLL_S = 5.0  # how often the wait for Dask shards checks that the cluster still has workers
DASK_NO_WORKERS_S = 120.0  # a Dask run with no worker connected for this long fails instead of waiting forever


def shard_jobs(cfg: PipelineConfig, store_root: str, data_key: str, split: str, lo: int,
               hi: int) -> list[tuple[list[str], int]]:
    """The image loads of images [lo, hi) of a split, one per teacher batch: (paths, side) for read_square_batch."""
    f = cfg.features
    paths = [r.image_path for r in _records(store_root, data_key, split)[lo:hi]]
    return [(paths[start : start + f.batch_size], f.resolution) for start in range(0, len(paths), f.batch_size)]


class Lent:
    """What a local run lends its shard tasks so the teacher never waits on the host: the images of every shard to
    do, decoded and resized by ``features.num_workers`` threads ahead of the teacher and across shard boundaries
    (decoding and resizing release the GIL), and threads that write a finished shard, then its marker, while the
    teacher runs the next one."""

    def __init__(self, cfg: PipelineConfig, store_root: str, data_key: str, todo: list[tuple[str, int, int]]) -> None:
        jobs: list[tuple[list[str], int]] = []
        self.spans: dict[tuple[str, int, int], tuple[int, int]] = {}  # shard -> its range of jobs
        for split, lo, hi in todo:
            shard = shard_jobs(cfg, store_root, data_key, split, lo, hi)
            self.spans[(split, lo, hi)] = (len(jobs), len(jobs) + len(shard))
            jobs += shard
        workers = cfg.features.num_workers
        self.images = WorkAhead(read_square_batch, jobs, workers, AHEAD_PER_WORKER * max(1, workers))
        self.writer = WriteBehind(depth=WRITERS, threads=WRITERS)

    def __enter__(self) -> Lent:
        return self

    def __exit__(self, *exc) -> None:
        with self.images:  # the workers stop after the last write ended, whatever it raised
            self.writer.__exit__(*exc)


def compute_shard(cfg: PipelineConfig, store_root: str, key: str, upstream: dict[str, str], split: str, lo: int,
                  hi: int, lent: Lent | None = None) -> str:
    """Compute images [lo, hi) of a split, one Zarr shard (idempotent: a range with a done marker is skipped); a
    plain function so Dask can run it. It writes into the staging folder the orchestrating run created and holds
    the lock of, which it therefore neither creates nor resets.

    A local run lends it ``lent``: its images are decoded already, and the shard is written after this returns,
    its marker after its data is on disk. On a Dask worker one thread decodes a batch ahead of the teacher, and the
    shard and its marker are written before this returns."""
    f = cfg.features
    out = FeaturesArtifact(Store(store_root).staging_files(key))
    if out.range_done(split, lo, hi):
        return f"{split}/{lo}-{hi}: reused"
    if lent is not None:
        lent.writer.check()  # a failed write fails the shards after it before they compute anything
    device = resolve_device(f.device)
    teacher = _teacher(store_root, upstream["teacher"], str(device))
    with ExitStack() as stack:
        if lent is None:
            jobs = shard_jobs(cfg, store_root, upstream["data"], split, lo, hi)
            images, (first, last) = stack.enter_context(WorkAhead(read_square_batch, jobs, 1, 1)), (0, len(jobs))
        else:
            images, (first, last) = lent.images, lent.spans[(split, lo, hi)]
        # The shard is gathered in memory and written once: a Zarr shard is one file, so writing it batch by batch
        # would re-read and re-write the whole file each time.
        feats, keys = [], []
        for batch in track(images.take(first, last), f"features {split} images {lo}-{hi}", last - first, unit="batch"):
            dense = teacher_dense(teacher, batch, f.batch_size, device, f.amp, keys_kept(f, split))
            feats.append(dense.features.numpy().astype(f.dtype))
            if keys_kept(f, split):
                keys.append(dense.keys.numpy().astype(f.dtype))
    shard = (split, lo, hi, np.concatenate(feats), np.concatenate(keys) if keys else None)
    if lent is None:
        out.write_range(*shard)
    else:
        lent.writer.submit(out.write_range, *shard)
    return f"{split}/{lo}-{hi}: computed"


# No cache policy: the lent pipeline is no input to hash, and a shard's own marker already makes it idempotent.
features_shard = task(name="features-shard", retries=SHARD_RETRIES, retry_delay_seconds=5, cache_policy=NO_CACHE)(
    compute_shard
)


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
    # The teacher the shards use: loaded once, before the shards and the text embeddings ask for it at once.
    teacher = _teacher(str(store.root), upstream["teacher"], str(resolve_device(f.device)))
    side, dim, key_dim = feature_grid(cfg, teacher)
    key_dim = key_dim if f.keep_keys else None
    data = DataArtifact.open(store, upstream["data"])
    sizes = {split: len(data.records(split)) for split in data.splits}
    units = {split: max(1, min(f.shard_size, n)) for split, n in sizes.items()}
    kept = {split: keys_kept(f, split) and key_dim is not None for split in data.splits}
    layout = {"dtype": f.dtype, "side": side, "dim": dim, "key_dim": key_dim,
              "splits": {split: {"images": sizes[split], "shard": units[split], "keys": kept[split]}
                         for split in data.splits}}
    out = FeaturesArtifact(files)
    if out.layout() != layout:
        if any(files.dir.iterdir()):
            log.warning("features: the work staged in %s was written in another layout (%s); starting over with %s",
                        files.dir, out.layout() or "not recorded", layout)
            out = FeaturesArtifact(store.staging(key, reset=True))
        for split in data.splits:
            out.create(split, sizes[split], side, dim, key_dim if kept[split] else None, f.dtype, units[split])
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


def class_text(cfg: PipelineConfig, store_root: str, upstream: dict[str, str]) -> torch.Tensor | None:
    """The prompt-ensembled text embeddings of the dataset's class names (None when it names none), on the stage's
    device: every (synonym, template) prompt of a large class list is minutes of a CPU's time."""
    classes = DataArtifact.open(Store(store_root), upstream["data"]).classes
    if not classes.num_classes:
        return None
    teacher = _teacher(store_root, upstream["teacher"], str(resolve_device(cfg.features.device)))
    templates = prompt_templates(cfg.features.extra_templates)
    return text_embeddings(teacher.model, teacher.tokenizer, classes.synonyms, templates).float().cpu()


def finish_features(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles,
                    text: Callable[[], torch.Tensor | None] | None = None) -> dict:
    """Prove every image is computed, then add the text embeddings of the dataset's class names: ``text()``, which
    the stage computes while its shards run, or :func:`class_text` here."""
    data = DataArtifact.open(store, upstream["data"])
    out = FeaturesArtifact(files)
    check_coverage(out, {split: len(data.records(split)) for split in data.splits})
    embeddings = text() if text is not None else class_text(cfg, str(store.root), upstream)
    if embeddings is not None:
        files.save_tensors("text.safetensors", {"text": embeddings})
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

    # What a local run lends its shard tasks; it reaches them through this closure, not as a flow parameter (the
    # Prefect API stores those), and it closes only after the sub-flow has ended every task.
    lent: Lent | None = None

    @flow(name="features-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))  # torch already uses every core
    def run_shards(todo: list[tuple[str, int, int]]) -> list[str]:
        if cfg.features.dask_address:
            return shards_on_dask(cfg, store_root, key, upstream, todo)
        started = time.perf_counter()
        futures = [features_shard.submit(cfg, store_root, key, upstream, *unit, lent) for unit in todo]
        messages = [fut.result() for fut in futures]
        seconds, images = time.perf_counter() - started, sum(hi - lo for _, lo, hi in todo)
        log.info(SHARDS_DONE, images, len(todo), seconds, images / seconds)
        return messages

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
        with ThreadPoolExecutor(1, thread_name_prefix="features-text") as aside:
            text = aside.submit(class_text, cfg, store_root, upstream)  # while the shards run
            if todo:
                with ExitStack() as stack:
                    if not cfg.features.dask_address:
                        lent = stack.enter_context(Lent(cfg, store_root, upstream["data"], todo))
                    run_shards(todo)
            result = run_stage(
                store, cfg, "features", upstream,
                lambda files: finish_features(cfg, store, upstream, files, text.result), force, reset_staging=False,
            )
    result.seconds = round(time.time() - start, 2)
    return result
