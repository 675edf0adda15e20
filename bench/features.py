"""Full features-stage throughput against dense extraction alone, on the same images, model and resolution.

The stage adds image decoding and resizing (``features.num_workers`` threads ahead of the teacher), Zarr writes (a
thread behind it), the class names' text embeddings (beside the shards) and Prefect orchestration around the
extraction. On a CPU-only host all of that competes with the extraction for the same cores; on a GPU host it runs
on cores the extraction leaves free. So the stage runs twice: with the real teacher on the host's device, and
with a simulated accelerator, a sleep of ``--gpu-ms`` per image that leaves the host's cores free, as a GPU does.
Printed: the ratio (stage images/s) / (extraction images/s), the overhead per image (split into the shard loop's and
the fixed cost of a run), the host work the overlap hides, and, from the simulated run, the per-image overhead left
exposed next to an accelerator and the stage throughput it implies for a run of ``--project-images`` images.
Extraction alone is timed before and after the stage and averaged, so a machine whose load drifts biases neither.
Runs offline: the teacher is an untrained clips4-vit-tiny (speed does not depend on the weights)."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from clips4.config import resolve_config
from clips4.data.prepare import read_square_batch
from clips4.device import resolve_device
from clips4.flows.pipeline import execute
from clips4.maskclip import DenseFeatures, prompt_templates, text_embeddings
from clips4.storage import ArtifactFiles, Store
from clips4.tasks import features
from clips4.tasks.features import SHARDS_DONE, teacher_dense
from clips4.tasks.readers import DataArtifact, FeaturesArtifact, load_teacher


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_in_thread(fn) -> float:
    """``fn`` timed in a worker thread, where a shard task runs the teacher: on a loaded CPU, OpenMP's spin-waits
    make torch markedly slower in the main thread than in others, which would flatter the stage."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(timed, fn).result()


@contextmanager
def shard_loop_log() -> Iterator[list[float]]:
    """The seconds the features stage reports its shard loop took (its SHARDS_DONE log line)."""
    seconds: list[float] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == SHARDS_DONE:
                seconds.append(record.args[2])

    logger, handler = logging.getLogger("clips4.tasks.features"), Catch()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield seconds
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="features.num_workers (default: the config's)")
    parser.add_argument("--gpu-ms", type=float, default=3.3,
                        help="extraction time per image of the GPU to project to (ViT-B/16 at 448 px: ~3.3 ms)")
    parser.add_argument("--project-images", type=int, default=118_287,
                        help="images of the run to project to (COCO-Stuff's train split)")
    args = parser.parse_args()
    store = tempfile.mkdtemp()
    cfg = resolve_config("demo", overrides=[
        f"data.synthetic.num_train={args.images}", "data.synthetic.num_val=1", "data.splits=[train]",
        "teacher.train=none", f"features.resolution={args.resolution}", "features.shard_size=128",
        *([f"features.num_workers={args.workers}"] if args.workers is not None else []),
    ])
    f = cfg.features
    results = {r.stage: r for r in execute(cfg, ["data", "teacher"], None, store)}
    device = resolve_device(f.device)
    teacher = load_teacher(Store(store).open(results["teacher"].key), device)
    data = DataArtifact.open(Store(store), results["data"].key)
    paths = [r.image_path for r in data.records("train")]
    n = len(paths)
    images: list[np.ndarray] = []
    decode = timed(lambda: images.extend(read_square_batch(paths[i : i + f.batch_size], args.resolution)
                                         for i in range(0, n, f.batch_size)))
    timed_in_thread(lambda: teacher_dense(teacher, images[0], f.batch_size, device, f.amp, False))  # warm-up
    feats: list[np.ndarray] = []

    def extract() -> None:
        feats.clear()
        for batch in images:  # as a shard task runs it: uint8 batches in, stored dtype out; train keeps no keys
            dense = teacher_dense(teacher, batch, f.batch_size, device, f.amp, False)
            feats.append(dense.features.numpy().astype(f.dtype))

    before = timed_in_thread(extract)
    with shard_loop_log() as loop:
        stage = timed(lambda: execute(cfg, ["features"], None, store))
    after = timed_in_thread(extract)
    alone = (before + after) / 2
    out = FeaturesArtifact(ArtifactFiles(Path(tempfile.mkdtemp())))
    dense = np.concatenate(feats)
    out.create("train", n, dense.shape[1], dense.shape[-1], None, f.dtype, f.shard_size)
    write = timed(lambda: [out.write_range("train", lo, min(lo + f.shard_size, n), dense[lo : lo + f.shard_size], None)
                           for lo in range(0, n, f.shard_size)])
    text = timed_in_thread(lambda: text_embeddings(teacher.model, teacher.tokenizer, data.classes.synonyms,
                                                   prompt_templates(f.extra_templates)))

    canned = torch.from_numpy(dense[: f.batch_size])

    def accelerator(teacher, images: np.ndarray, batch_size: int, device, amp: bool, with_keys: bool) -> DenseFeatures:
        """What the shard loop sees of a GPU: ``--gpu-ms`` per image of waiting, the host's cores free meanwhile."""
        time.sleep(len(images) * args.gpu_ms / 1000)
        return DenseFeatures(canned[: len(images)], None)  # train keeps no keys

    real_dense, features.teacher_dense = features.teacher_dense, accelerator
    try:
        with shard_loop_log() as simulated_loop:
            simulated = timed(lambda: execute(cfg, ["features"], "features", store))
    finally:
        features.teacher_dense = real_dense

    per = lambda seconds: 1000 * seconds / n  # noqa: E731  (ms per image)
    shards, (sim_shards,) = loop[0], simulated_loop
    fixed, sim_fixed = stage - shards, simulated - sim_shards
    t, big = args.gpu_ms, args.project_images
    exposed = per(sim_shards) - t
    projected = big / (sim_fixed + big * (t + exposed) / 1000)
    print(f"{n} images at {args.resolution}px, {f.num_workers} image threads, torch threads {torch.get_num_threads()}: "
          f"extraction {n / alone:.1f} img/s (before {n / before:.1f}, after {n / after:.1f}), "
          f"features stage {n / stage:.1f} img/s")
    print(f"features stage/extraction throughput ratio: {alone / stage:.3f}")
    print(f"overhead per image: {per(stage - alone):.2f} ms = (stage {stage:.2f} s - extraction {alone:.2f} s) / {n} "
          f"images = {per(shards - alone):.2f} ms in the shard loop ({shards:.2f} s) + {per(fixed):.2f} ms of fixed "
          f"costs ({fixed:.2f} s a run: teacher load and feature grid, Prefect sub-flow, publication)")
    print(f"host work the overlap moves off the teacher's path: decode+resize {per(decode):.2f} ms/img, write and seal "
          f"{per(write):.2f} ms/img, text embeddings of the class names {text:.2f} s")
    print(f"simulated accelerator at {t} ms/img: shard loop {n / sim_shards:.1f} img/s = {per(sim_shards):.2f} ms/img, "
          f"{exposed:.2f} ms/img exposed; stage {n / simulated:.1f} img/s with {sim_fixed:.2f} s fixed")
    print(f"projection, N = {big} images: stage = N / (fixed + N * (gpu + exposed) / 1000) = {big} / ({sim_fixed:.2f} + "
          f"{big} * ({t} + {exposed:.2f}) / 1000) = {projected:.0f} img/s, ratio {projected * t / 1000:.2f} of the "
          f"accelerator's {1000 / t:.0f} img/s (the decoding and writing threads must keep pace at that resolution)")


if __name__ == "__main__":
    main()
