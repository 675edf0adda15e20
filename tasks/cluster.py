"""The cluster stage: unknown prototypes by FAISS spherical k-means, known class text embeddings held fixed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from prefect import task

from clips4.config import PipelineConfig
from clips4.prototypes import LabelRule, modality_gap, move_across_gap, named_clusters, unknown_prototypes
from clips4.sampling import sample_features
from clips4.visualize import prototype_map
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.observe import observed
from clips4.tasks.readers import PROTOTYPES, FeaturesArtifact


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
        sample = move_across_gap(torch.from_numpy(sample), torch.from_numpy(gap)).numpy()
    use_gpu = None if c.device == "auto" else c.device.startswith("cuda")
    rule = LabelRule.from_config(c).with_floor(sample, known, c.known_quantile)
    kmeans = dict(iterations=c.iterations, seed=c.seed, max_points_per_centroid=c.max_points_per_centroid,
                  use_gpu=use_gpu)
    # L_sem's labelling rule needs the floor (and the named centres) in training
    tensors = {"gap": torch.from_numpy(gap), "known_floor": torch.tensor([rule.known_floor])}
    anchors_per_class = np.zeros(len(known_ids), np.int64)
    if c.labels == "named_clusters":
        found = named_clusters(sample, known, c.num_centres, rule, **kmeans)
        protos, known_sizes, unknown_sizes = found.prototypes, found.known_sizes, found.unknown_sizes
        tensors |= {"anchors": torch.from_numpy(found.anchors), "anchor_class": torch.from_numpy(found.anchor_class)}
        anchors_per_class = np.bincount(found.anchor_class, minlength=len(known_ids))
    else:
        protos, known_sizes, unknown_sizes = unknown_prototypes(sample, known, c.num_unknown, rule=rule, **kmeans)
    files.save_tensors(
        PROTOTYPES,
        {"known": torch.from_numpy(known).float(), "unknown": torch.from_numpy(protos).float(), **tensors},
    )
    names = [classes.names[i] for i in known_ids] + [f"unknown-{j}" for j in range(len(protos))]
    table = pd.DataFrame(
        {
            "name": names,
            "role": ["known"] * len(known_ids) + ["unknown"] * len(protos),
            "class_id": known_ids + [-1] * len(protos),
            "points": np.concatenate([known_sizes, unknown_sizes]).astype(int),
            "named_clusters": np.concatenate([anchors_per_class, np.zeros(len(protos), np.int64)]).astype(int),
        }
    )
    files.write_table("prototypes", table, also=("csv", "md"))
    prototype_map(known, protos, [classes.names[i] for i in known_ids], files.file("prototypes.png"))
    gap_norm = round(float(np.linalg.norm(gap)), 4)
    known_share = round(float(known_sizes.sum()) / max(len(sample), 1), 4)  # sampled points labelled a known class
    return {"known": len(known_ids), "unknown": len(protos), "sample": len(sample), "gap_norm": gap_norm,
            "known_floor": round(rule.known_floor, 4), "known_label_share": known_share,
            "named_clusters": int(anchors_per_class.sum())}


@task(name="cluster-stage")
def cluster_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the unknown-prototype artifact."""
    store = Store(store_root)
    with observed():
        return run_stage(store, cfg, "cluster", upstream, lambda files: build_cluster(cfg, store, upstream, files), force)
