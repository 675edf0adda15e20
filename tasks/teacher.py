"""The teacher stage: resolve a frozen open_clip teacher, or pre-train a small one on the synthetic captions."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import torch
from prefect import task

from clips4.config import PipelineConfig
from clips4.data.io import read_image
from clips4.data.prepare import resize_square
from clips4.data.synthetic import SyntheticWorld
from clips4.device import resolve_device
from clips4.progress import track
from clips4.teacher import create_teacher, pretrain_synthetic, register_model_configs, retrieval_top1, save_teacher
from clips4.visualize import plot_curves
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.observe import observed
from clips4.tasks.readers import MODEL_DIR, TEACHER_INFO, DataArtifact, load_teacher


def _split_arrays(data: DataArtifact, split: str, size: int) -> tuple[np.ndarray, list[str]]:
    records = data.records(split)
    images = np.stack([resize_square(read_image(r.image_path), size) for r in records])
    return images, [r.caption or "" for r in records]


def build_teacher(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    t = cfg.teacher
    device = resolve_device(t.device)
    register_model_configs()
    info = {"model": t.model, "pretrained": t.pretrained, "source": t.train}
    summary: dict = {}
    if t.train == "synthetic":
        if cfg.data.dataset != "synthetic":
            raise ValueError("teacher.train=synthetic pre-trains on the synthetic world; set data.dataset=synthetic "
                             "or give a CLIP teacher (teacher.model + teacher.pretrained)")
        data = DataArtifact.open(store, upstream["data"])
        probe = create_teacher(t.model, None, torch.device("cpu"))
        world = SyntheticWorld(cfg.data.synthetic)
        samples = [world.sample("teacher", i) for i in track(range(t.num_images), "teacher images", unit="img")]
        train_images = np.stack([resize_square(s.image, probe.image_size) for s in samples])
        train_captions = [s.caption for s in samples]
        model, history = pretrain_synthetic(
            t.model,
            train_images,
            train_captions,
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            seed=t.seed,
            device=device,
            workdir=files.file("checkpoints"),
            checkpoint_every=t.checkpoint_every,
            class_names=world.class_names,
            single_class_prob=t.single_class_prob,
        )
        save_teacher(model, t.model, files.file(MODEL_DIR))
        shutil.rmtree(files.file("checkpoints"), ignore_errors=True)
        curve = pd.DataFrame({"step": range(1, len(history) + 1), "component": "clip", "value": history})
        files.write_table("history", curve, also=("csv",))
        plot_curves(curve, files.file("loss.png"))
        teacher = load_teacher(files, device)
        held = "val" if "val" in data.splits else "train"
        val_images, val_captions = _split_arrays(data, held, teacher.image_size)
        retrieval = retrieval_top1(teacher, val_images, val_captions)
        files.write_json("retrieval.json", {"split": held, **retrieval})
        summary = {"retrieval_top1": round(float(retrieval["top1"]), 4), "chance": round(float(retrieval["chance"]), 4)}
        print(f"teacher {t.model}: {held} image->text retrieval top-1 {retrieval['top1']:.3f} (chance {retrieval['chance']:.3f})")
    else:
        teacher = create_teacher(t.model, t.pretrained, torch.device("cpu"))
    info.update(embed_dim=teacher.embed_dim, image_size=teacher.image_size, mean=list(teacher.mean), std=list(teacher.std))
    files.write_json(TEACHER_INFO, info)
    return {**summary, "embed_dim": teacher.embed_dim}


@task(name="teacher-stage")
def teacher_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the teacher artifact."""
    store = Store(store_root)
    with observed():
        return run_stage(store, cfg, "teacher", upstream, lambda files: build_teacher(cfg, store, upstream, files), force)
