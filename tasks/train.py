"""The train stage: CLIP-S4 student training on stored images, regions, CLIP maps and prototypes (resumable).

Under torchrun, ``clips4 run`` on rank 0 runs the pipeline as usual and its train stage trains with DDP; every other
rank runs :func:`follow_train`, which waits for the stage's inputs and trains beside rank 0, writing nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import torch
import zarr

from prefect import task

from clips4.config import PipelineConfig
from clips4.device import resolve_device
from clips4.inference import CENTRE_BATCH, embedding_centre, student_embedder
from clips4.prototypes import LabelRule
from clips4.training import WEIGHTS_FILE, TrainData, train_student
from clips4.visualize import plot_curves
from clips4.storage import ArtifactFiles, Store
from clips4.tasks.common import StageResult, plan_keys, run_stage
from clips4.tasks.stages import BY_NAME, forced_stages
from clips4.tasks.observe import observed
from clips4.tasks.readers import PROTOTYPES, STUDENT, STUDENT_INFO, DataArtifact, FeaturesArtifact
from clips4.tasks.report import publish_losses

# Training reads every image steps*batch/N times. Reading one image's (pixels, regions, CLIP map) from Zarr costs
# ~8 ms here, ~80 s over the demo's 9600 image reads; reading the three arrays whole takes 1.6 s. Arrays up to this
# size are therefore read once into memory; larger ones stay lazy (one image at a time).
PRELOAD_BYTES = 2 * 2**30
CHECKPOINTS = "checkpoints"  # folder in the train artifact's staging area; removed before publication


def in_memory_if_small(array: zarr.Array) -> np.ndarray | zarr.Array:
    """The whole array as numpy when it is under PRELOAD_BYTES, else the lazy array (read one image at a time)."""
    size = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
    return np.asarray(array[...]) if size <= PRELOAD_BYTES else array


def train_inputs(store: Store, upstream: dict[str, str], rule: LabelRule) -> tuple[TrainData, dict, dict[str, torch.Tensor]]:
    """What the student trains on, read from the upstream artifacts: the arrays, the teacher's info, the prototypes
    (labelled by ``rule``, the cluster stage's)."""
    data = DataArtifact.open(store, upstream["data"])
    feats = FeaturesArtifact.open(store, upstream["features"])
    protos = store.open(upstream["cluster"]).load_tensors(PROTOTYPES)
    train_data = TrainData(
        images=in_memory_if_small(data.train_images()),
        clip_maps=in_memory_if_small(feats.features("train")),
        regions=in_memory_if_small(data.train_regions()),
        known_text=protos["known"],  # held-out classes were never in here (cluster stage)
        prototypes=protos["unknown"],
        gap=protos.get("gap"),  # artifacts clustered without the correction have none
        label_rule=stored_rule(rule, protos),
    )
    return train_data, feats.teacher_info(), protos


def stored_rule(rule: LabelRule, protos: dict[str, torch.Tensor]) -> LabelRule:
    """``rule`` with what the cluster stage measured for it: the known floor and the named centres (artifacts made
    before either existed have none)."""
    if "known_floor" in protos:
        rule = replace(rule, known_floor=float(protos["known_floor"][0]))
    if "anchors" in protos:
        rule = rule.with_anchors(protos["anchors"], protos["anchor_class"])
    return rule


def build_train(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    t = cfg.train
    train_data, teacher, protos = train_inputs(store, upstream, LabelRule.from_config(cfg.cluster))
    workdir, device = files.file(CHECKPOINTS), resolve_device(t.device)
    result = train_student(train_data, t, (teacher["mean"], teacher["std"]), workdir, device)
    shutil.copyfile(workdir / WEIGHTS_FILE, files.file(STUDENT))  # final weights, architecture in the metadata
    embed = student_embedder(result.model, CENTRE_BATCH, (1.0,))
    centre = embedding_centre(embed, train_data.images)
    files.save_tensors(PROTOTYPES, {**protos, "unknown": torch.as_tensor(result.prototypes).float(), "centre": centre})
    files.write_json(
        STUDENT_INFO,
        {"student": t.student, **result.model.preprocessing.to_dict(), "steps": result.steps_done},
    )
    files.write_table("losses", result.losses, also=("csv",))
    plot_curves(result.losses, files.file("losses.png"))
    shutil.rmtree(workdir, ignore_errors=True)
    last = result.losses[result.losses["step"] == result.losses["step"].max()]
    share = {} if result.known_label_share is None else {"known_label_share": round(result.known_label_share, 4)}
    return {"steps": result.steps_done, "processes": result.processes, **share,
            **{f"loss_{r.component}": round(float(r.value), 4) for r in last.itertuples()}}


@task(name="train-stage")
def train_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the trained student; a killed run resumes from its last checkpoint in staging. The loss
    table is also shown in the run's artifacts."""
    store = Store(store_root)
    with observed():
        result = run_stage(store, cfg, "train", upstream, lambda files: build_train(cfg, store, upstream, files), force)
        publish_losses(cfg, store, result.key)
    return result


def torchrun_rank() -> int:
    """This process's rank in a torchrun job; 0 when torchrun did not launch it."""
    return int(os.environ.get("RANK", "0"))


def follow_train(
    cfg: PipelineConfig,
    store: Store,
    stages: list[str],
    force: str | None,
    poll_s: float = 5.0,
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> bool:
    """A torchrun rank other than 0 in ``clips4 run``: train beside rank 0 when its run trains; returns whether it did.

    Rank 0 builds the upstream stages and then enters the train stage; this rank waits until those artifacts are in
    the store (rebuilt ones: published after this rank started), reads the same inputs, and joins the DDP group in
    :func:`~clips4.training.train_student` with rank 0's staging folder as the checkpoint folder, so a resumed job
    resumes on every rank. Only rank 0 writes (checkpoints, the artifact). The store must be on a filesystem every
    rank sees.
    """
    forced = forced_stages(force)
    keys = plan_keys(cfg, ["train"])
    if "train" not in stages or ("train" not in forced and store.exists(keys["train"])):
        return False  # rank 0 does not train in this run (or reuses the stored student)
    upstream = {u: keys[u] for u in BY_NAME["train"].reads(cfg)}
    started = datetime.now(timezone.utc).replace(microsecond=0)

    def ready(stage: str, key: str) -> bool:
        if not store.exists(key):
            return False
        return stage not in forced or datetime.fromisoformat(store.manifest(key).created) >= started

    rank, world = torchrun_rank(), os.environ.get("WORLD_SIZE", "?")
    announced = False
    while waiting := [s for s, k in upstream.items() if not ready(s, k)]:
        if not announced:
            say(f"rank {rank} of {world}: waiting for rank 0 to build {', '.join(waiting)} in {store.root}")
            announced = True
        time.sleep(poll_s)
    say(f"rank {rank} of {world}: training {cfg.train.student} beside rank 0 (train artifact {keys['train']})")
    train_data, teacher, _ = train_inputs(store, upstream, LabelRule.from_config(cfg.cluster))
    workdir = store.staging_dir(keys["train"]) / CHECKPOINTS
    train_student(train_data, cfg.train, (teacher["mean"], teacher["std"]), workdir, resolve_device(cfg.train.device))
    return True
