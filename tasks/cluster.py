"""The cluster stage: unknown prototypes by FAISS spherical k-means, known class text embeddings held fixed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from prefect import task

from clips4.config import PipelineConfig
from clips4.prototypes import close_gap, modality_gap, unknown_prototypes
from clips4.visualize import prototype_map
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.observe import observed
from clips4.tasks.readers import PROTOTYPES, FeaturesArtifact


def sample_features(features, size: int, seed: int) -> np.ndarray:
    """``size`` dense vectors drawn uniformly over the images and positions of a [N,h,w,D] array, re-normalised.
    Reads one image at a time, so memory stays bounded by the sample, not the dataset."""
    n, h, w, d = features.shape
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.integers(0, n * h * w, size=min(size, n * h * w)))
    image, pos = np.divmod(picks, h * w)
    out = np.empty((len(picks), d), np.float32)
    for i in np.unique(image):
        rows = image == i
        out[rows] = np.asarray(features[int(i)]).reshape(h * w, d)[pos[rows]]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def build_cluster(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    c = cfg.cluster
    feats = FeaturesArtifact.open(store, upstream["features"])
    classes = feats.classes
    text = feats.text()
    known_ids = classes.known_ids
    known = text[known_ids].numpy() if text is not None else np.zeros((0, feats.features("train").shape[-1]), np.float32)
    sample = sample_features(feats.features("train"), c.sample_size, c.seed)
    gap = np.zeros(sample.shape[1], np.float32)
    if c.close_modality_gap and len(known):
        gap = modality_gap(sample, known)
        sample = close_gap(sample, gap)
    use_gpu = None if c.device == "auto" else c.device.startswith("cuda")
    protos, known_sizes, unknown_sizes = unknown_prototypes(
        sample, known, c.num_unknown, c.iterations, c.seed, c.max_points_per_centroid, use_gpu=use_gpu
    )
    files.save_tensors(
        PROTOTYPES,
        {
            "known": torch.from_numpy(known).float(),
            "unknown": torch.from_numpy(protos).float(),
            "gap": torch.from_numpy(gap),
        },
    )
    names = [classes.names[i] for i in known_ids] + [f"unknown-{j}" for j in range(len(protos))]
    table = pd.DataFrame(
        {
            "name": names,
            "role": ["known"] * len(known_ids) + ["unknown"] * len(protos),
            "class_id": known_ids + [-1] * len(protos),
            "points": np.concatenate([known_sizes, unknown_sizes]).astype(int),
        }
    )
    files.write_table("prototypes", table, also=("csv", "md"))
    prototype_map(known, protos, [classes.names[i] for i in known_ids], files.file("prototypes.png"))
    gap_norm = round(float(np.linalg.norm(gap)), 4)
    return {"known": len(known_ids), "unknown": len(protos), "sample": len(sample), "gap_norm": gap_norm}


@task(name="cluster-stage")
def cluster_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the unknown-prototype artifact."""
    store = Store(store_root)
    with observed():
        return run_stage(store, cfg, "cluster", upstream, lambda files: build_cluster(cfg, store, upstream, files), force)
