"""The train stage: CLIP-S4 student training on stored images, regions, CLIP maps and prototypes (resumable)."""

from __future__ import annotations

import shutil

import numpy as np
import torch
import zarr

from prefect import task

from clips4.config import PipelineConfig
from clips4.device import resolve_device
from clips4.training import WEIGHTS_FILE, TrainData, train_student
from clips4.visualize import plot_curves
from storage import ArtifactFiles, Store
from tasks.common import StageResult, run_stage
from tasks.readers import PROTOTYPES, STUDENT, STUDENT_INFO, DataArtifact, FeaturesArtifact

# Training reads every image steps*batch/N times. Reading one image's (pixels, regions, CLIP map) from Zarr costs
# ~8 ms here, ~80 s over the demo's 9600 image reads; reading the three arrays whole takes 1.6 s. Arrays up to this
# size are therefore read once into memory; larger ones stay lazy (one image at a time).
PRELOAD_BYTES = 2 * 2**30


def in_memory_if_small(array: zarr.Array) -> np.ndarray | zarr.Array:
    """The whole array as numpy when it is under PRELOAD_BYTES, else the lazy array (read one image at a time)."""
    size = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
    return np.asarray(array[...]) if size <= PRELOAD_BYTES else array


def build_train(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    t = cfg.train
    data = DataArtifact.open(store, upstream["data"])
    feats = FeaturesArtifact.open(store, upstream["features"])
    protos = store.open(upstream["cluster"]).load_tensors(PROTOTYPES)
    teacher = feats.teacher_info()
    train_data = TrainData(
        images=in_memory_if_small(data.train_images()),
        clip_maps=in_memory_if_small(feats.features("train")),
        regions=in_memory_if_small(data.train_regions()),
        known_text=protos["known"],  # held-out classes were never in here (cluster stage)
        prototypes=protos["unknown"],
        gap=protos.get("gap"),  # artifacts clustered without the correction have none
    )
    workdir = files.file("checkpoints")
    result = train_student(train_data, t, (teacher["mean"], teacher["std"]), workdir, resolve_device(t.device))
    shutil.copyfile(workdir / WEIGHTS_FILE, files.file(STUDENT))  # final weights, architecture in the metadata
    files.save_tensors(PROTOTYPES, {**protos, "unknown": torch.as_tensor(result.prototypes).float()})
    files.write_json(
        STUDENT_INFO,
        {
            "student": t.student,
            "input_size": t.input_size,
            "mean": teacher["mean"],
            "std": teacher["std"],
            "steps": result.steps_done,
        },
    )
    files.write_table("losses", result.losses, also=("csv",))
    plot_curves(result.losses, files.file("losses.png"))
    shutil.rmtree(workdir, ignore_errors=True)
    last = result.losses[result.losses["step"] == result.losses["step"].max()]
    return {"steps": result.steps_done, **{f"loss_{r.component}": round(float(r.value), 4) for r in last.itertuples()}}


@task(name="train-stage")
def train_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the trained student; a killed run resumes from its last checkpoint in staging."""
    store = Store(store_root)
    return run_stage(store, cfg, "train", upstream, lambda files: build_train(cfg, store, upstream, files), force)
