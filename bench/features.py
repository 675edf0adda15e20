"""Full features-stage throughput against dense extraction alone, on the same images, model and resolution.

The stage adds image decoding, resizing, Zarr writes and Prefect task orchestration around the extraction; the goal
is a ratio (stage images/s) / (extraction images/s) >= 0.9. Runs offline: the teacher is an untrained
clips4-vit-tiny (speed does not depend on the weights)."""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from clips4.config import resolve_config
from clips4.data.io import read_image
from clips4.data.prepare import resize_square
from clips4.device import resolve_device
from clips4.maskclip import extract_dense
from clips4.flows.pipeline import execute
from clips4.storage import Store
from clips4.tasks.readers import DataArtifact, load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    store = tempfile.mkdtemp()
    cfg = resolve_config("demo", overrides=[
        f"data.synthetic.num_train={args.images}", "data.synthetic.num_val=1", "data.splits=[train]",
        "teacher.train=none", f"features.resolution={args.resolution}", "features.shard_size=128",
    ])
    results = {r.stage: r for r in execute(cfg, ["data", "teacher"], None, store)}
    device = resolve_device("auto")
    teacher = load_teacher(Store(store).open(results["teacher"].key), device)
    records = DataArtifact.open(Store(store), results["data"].key).records("train")
    images = np.stack([resize_square(read_image(r.image_path), args.resolution) for r in records])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    extract_dense(teacher.model, x[:32], 32, device)  # warm-up
    start = time.perf_counter()
    extract_dense(teacher.model, x, cfg.features.batch_size, device, cfg.features.amp, cfg.features.keep_keys)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    execute(cfg, ["features"], None, store)
    stage = time.perf_counter() - start
    print(f"{len(records)} images at {args.resolution}px: extraction {len(records) / alone:.1f} img/s, "
          f"features stage {len(records) / stage:.1f} img/s")
    print(f"features stage/extraction throughput ratio: {alone / stage:.3f}")


if __name__ == "__main__":
    main()
