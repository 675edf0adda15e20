"""The evaluate stage: MaskCLIP (the teacher, zero-shot) and CLIP-S4 (the student) in one harness and one table.

Tasks: ``language`` (known + held-out class names; held-out names are only appended here, at test time),
``unsupervised`` (k-means + Hungarian) and ``probe`` (linear 1x1 probe trained on the train split's labels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import shutil
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from prefect import task

from clips4.config import PipelineConfig
from clips4.data.io import read_image
from clips4.data.records import Record
from clips4.device import resolve_device
from clips4.evaluation import (
    cone_shift,
    language_logits,
    resize_labels,
    score_classifier,
    train_linear_probe,
    unsupervised_segmentation,
    upsample_argmax,
)
from clips4.inference import embed_multiscale, scales_label, strided, student_embedder
from clips4.maskclip import maskclip_logits
from clips4.progress import track
from clips4.training import move_across_gap
from clips4.visualize import embedding_comparison, overlay_grid, share_bars
from clips4.storage import ArtifactFiles, Store, StoreError
from clips4.tasks.calibration import FLOOR_IMAGES, Embedder, array_embedder, new_class_floor
from clips4.tasks.common import StageResult, run_stage
from clips4.tasks.features import teacher_dense
from clips4.tasks.readers import DataArtifact, FeaturesArtifact, TrainArtifact, load_teacher
from clips4.tasks.observe import observed
from clips4.tasks.report import publish_metrics, publish_pictures

CACHE = "cache"  # student embeddings of the evaluated splits, removed once the tables are written


@dataclass
class SplitBatches:
    """Re-iterable (embeddings [B,D,h,w], labels [B,H,W]) pairs, one image at a time (label sizes may differ).

    Embeddings come from ``embed`` on demand, so memory holds one image, whatever the split's size."""

    records: list[Record]
    embed: Embedder
    read_label: Callable[[str], np.ndarray]

    def __len__(self) -> int:
        """Known length, so progress shows a total and time left."""
        return len(self.records)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, r in enumerate(self.records):
            yield self.embed([i]), torch.from_numpy(self.read_label(r.label_path).astype(np.int64))[None]


def cache_embeddings(files: ArtifactFiles, name: str, embed: Callable[[list[np.ndarray]], torch.Tensor],
                     records: list[Record], batch_size: int):
    """Embed a split once, in batches, into a float16 Zarr array [N,h,w,D] of the staging folder (memory stays one
    batch). ``embed`` maps a list of uint8 RGB images to [B,D,h,w]."""
    out = None
    for start in track(range(0, len(records), batch_size), f"embedding {name}", unit="batch"):
        batch = records[start : start + batch_size]
        emb = embed([read_image(r.image_path) for r in batch]).permute(0, 2, 3, 1)
        if out is None:
            shape = (len(records), *emb.shape[1:])
            out = files.create_array(f"{CACHE}/{name}.zarr", shape, (1, *emb.shape[1:]), "float16", compress=False)
        out[start : start + len(batch)] = emb.numpy().astype(np.float16)
    return out


def maskclip_embedder(teacher, device, batch_size: int, amp: bool) -> Callable[[np.ndarray], torch.Tensor]:
    return lambda images: teacher_dense(teacher, images, batch_size, device, amp, False).features.permute(0, 3, 1, 2).float()


def _rows(method: str, task_name: str, scores: dict) -> list[dict]:
    return [
        {"method": method, "task": task_name, "metric": m, "value": float(scores[m])}
        for m in ("mIoU", "mIoU_known", "mIoU_unknown", "hIoU", "pAcc")
        if m in scores and not (task_name != "language" and m not in ("mIoU", "pAcc"))
    ]


def _per_class(method: str, task_name: str, scores: dict, names: list[str], held_out: list[bool]) -> pd.DataFrame:
    return pd.DataFrame(
        {"method": method, "task": task_name, "class": names, "held_out": held_out, "iou": scores["per_class_iou"]}
    )


def build_evaluate(cfg: PipelineConfig, store: Store, upstream: dict[str, str], files: ArtifactFiles) -> dict:
    e = cfg.evaluate
    device = resolve_device(e.device)
    data = DataArtifact.open(store, upstream["data"])
    feats = FeaturesArtifact.open(store, upstream["features"])
    classes = data.classes
    if not classes.num_classes:
        raise ValueError(f"dataset {cfg.data.dataset} has no classes or labels; evaluation needs a labelled split")
    records = data.records(e.split)
    if not records or any(r.label_path is None for r in records):
        raise ValueError(f"split {e.split!r} has no labelled images; set evaluate.split to a labelled split")
    text = feats.text().to(device)
    held = classes.held_out_ids
    teacher_feats, teacher_keys = feats.features(e.split), feats.keys(e.split)
    shutil.rmtree(files.file(CACHE), ignore_errors=True)  # never trust a cache a killed run left behind
    embedders: dict[str, Embedder] = {"maskclip": array_embedder(teacher_feats)}
    trained = TrainArtifact.open(store, upstream["train"]) if "train" in upstream else None
    gap = trained.gap() if trained is not None else None
    centre = trained.centre() if trained is not None and e.recentre_gap else None
    # Language scores per method; only the student was trained towards the known classes' text cone.
    classify = {"clips4": partial(language_logits, weights=text, centre=centre)}
    train_embedders: dict[str, Embedder] = {"maskclip": array_embedder(feats.features("train"))} if "train" in data.splits else {}
    scales = e.test_scales
    if trained is not None:
        model, info = trained.student(device)
        student = student_embedder(model, info["input_size"], info["mean"], info["std"], device, e.batch_size, scales)
        embedders["clips4"] = array_embedder(cache_embeddings(files, e.split, student, records, e.batch_size))
        floor = "language" in e.tasks and e.new_class_floor > 0 and bool(held)
        if train_embedders and ("probe" in e.tasks or floor):
            cached = cache_embeddings(files, "train", student, data.records("train"), e.batch_size)
            train_embedders["clips4"] = array_embedder(cached)
        if floor and "clips4" in train_embedders:
            bias, table = new_class_floor(
                train_embedders["maskclip"], train_embedders["clips4"], strided(len(data.records("train")), FLOOR_IMAGES),
                e.batch_size, text, centre, held, classes.names, e.new_class_floor, e.calibration_pixels, e.seed, device,
            )
            files.write_table("calibration", table, also=("csv",))
            share_bars(table, files.file("calibration.png"))
            classify["clips4"] = partial(language_logits, weights=text, centre=centre, bias=bias)
    if scales != [1.0]:
        # MaskCLIP on the same scales: a larger input sharpens the teacher's map too.
        teacher = load_teacher(store.open(_teacher_key(store, upstream["features"])), device)
        maskclip = partial(embed_multiscale, maskclip_embedder(teacher, device, e.batch_size, cfg.features.amp),
                           size=cfg.features.resolution, scales=scales)
        cached = cache_embeddings(files, f"maskclip-{e.split}", maskclip, records, e.batch_size)
        embedders[f"maskclip@{scales_label(scales)}"] = array_embedder(cached)

    rows: list[dict] = []
    per_class: list[pd.DataFrame] = []

    def record(method: str, task_name: str, scores: dict) -> None:
        rows.extend(_rows(method, task_name, scores))
        per_class.append(_per_class(method, task_name, scores, classes.names, classes.held_out))

    language = partial(language_logits, weights=text)
    for method, embed in embedders.items():
        batches = SplitBatches(records, embed, data.label_reader(cfg.data))
        if "language" in e.tasks:
            scored = score_classifier(batches, classify.get(method, language), classes.num_classes, device, held)
            record(method, "language", scored[0])
        if "unsupervised" in e.tasks:
            record(method, "unsupervised", unsupervised_segmentation(batches, classes.num_classes, device, e.seed).scores)
        if "probe" in e.tasks and method in train_embedders:
            record(method, "probe", _probe_scores(cfg, data, train_embedders[method], batches, device))
    if "language" in e.tasks and teacher_keys is not None:
        kspd = _maskclip_kspd(teacher_feats, teacher_keys, text)
        batches = SplitBatches(records, kspd, data.label_reader(cfg.data))
        record("maskclip+kspd", "language", score_classifier(batches, lambda s: s, classes.num_classes, device, held)[0])
    if "language" in e.tasks and gap is not None:
        # The correction the student was trained with, applied to the teacher: what calibration alone gives. Moved
        # by the gap, the teacher's features are centred at the known classes' mean text (that is how the gap is
        # measured); re-centring moves them on to the classes named now, as the student's embeddings are.
        known_centre = trained.prototypes["known"].float().mean(0)
        offset = gap if centre is None else gap + cone_shift(text, known_centre).cpu()
        moved = lambda idx: move_across_gap(embedders["maskclip"](idx), offset)  # noqa: E731
        batches = SplitBatches(records, moved, data.label_reader(cfg.data))
        record("maskclip+gap", "language", score_classifier(batches, language, classes.num_classes, device, held)[0])

    metrics = pd.DataFrame(rows, columns=["method", "task", "metric", "value"])
    files.write_table("metrics", metrics, also=("csv", "md"))
    files.write_table("per_class", pd.concat(per_class, ignore_index=True), also=("csv",))
    _pictures(cfg, files, data, records, embedders, {m: classify.get(m, language) for m in embedders}, device)
    shutil.rmtree(files.file(CACHE), ignore_errors=True)
    return {
        f"{r['method']}/{r['task']}/{r['metric']}": round(r["value"], 4)
        for r in rows
        if r["metric"] in ("mIoU", "mIoU_known", "mIoU_unknown")
    }


def _teacher_key(store: Store, features_key: str) -> str:
    key = store.ancestor(features_key, "teacher")
    if key is None:
        raise StoreError(f"the teacher of {features_key} is not in {store.root}; evaluate.test_scales other than "
                         "[1] run it again on the rescaled images: rerun the teacher stage or set evaluate.test_scales=[1]")
    return key


def _maskclip_kspd(features, keys, text: torch.Tensor) -> Embedder:
    """MaskCLIP with key smoothing and prompt denoising: yields class scores instead of embeddings."""

    def scores(idx: list[int]) -> torch.Tensor:
        f = torch.from_numpy(np.asarray(features[idx[0] : idx[-1] + 1])).float()
        k = torch.from_numpy(np.asarray(keys[idx[0] : idx[-1] + 1])).float()
        return maskclip_logits(f, text.cpu(), keys=k, key_smoothing=True, prompt_denoise=True)

    return scores


def _probe_scores(cfg: PipelineConfig, data: DataArtifact, embed: Embedder, val_batches, device) -> dict:
    """Linear probe on the train split's frozen embeddings (labels at feature resolution), scored on ``split``."""
    e = cfg.evaluate
    reader = data.label_reader(cfg.data)
    emb, labels = [], []
    for i, r in enumerate(data.records("train")):
        x = embed([i]).half()
        emb.append(x)
        labels.append(resize_labels(torch.from_numpy(reader(r.label_path).astype(np.int64))[None], x.shape[-2:]))
    probe = train_linear_probe(torch.cat(emb), torch.cat(labels), data.classes.num_classes, e.probe_epochs, e.probe_lr, e.seed, device)
    with torch.no_grad():
        return score_classifier(val_batches, probe, data.classes.num_classes, device)[0]


def _pictures(cfg, files: ArtifactFiles, data: DataArtifact, records, embedders: dict[str, Embedder],
              classify: dict[str, Callable[[torch.Tensor], torch.Tensor]], device: torch.device) -> None:
    n = min(cfg.evaluate.num_pictures, len(records))
    if n == 0:
        return
    reader = data.label_reader(cfg.data)
    images = [read_image(r.image_path) for r in records[:n]]
    labels = [reader(r.label_path) for r in records[:n]]
    preds = {}
    for method, embed in embedders.items():
        preds[method] = [
            upsample_argmax(classify[method](embed([i]).to(device)), labels[i].shape)[0].cpu().numpy()
            for i in range(n)
        ]
    overlay_grid(images, labels, preds, data.classes.names, data.classes.palette, files.file("overlays.png"))
    if "clips4" in embedders:
        shown = range(min(n, 3))
        embedding_comparison(
            images[: len(shown)],
            [embedders["clips4"]([i])[0] for i in shown],
            [embedders["maskclip"]([i])[0] for i in shown],
            files.file("embeddings.png"),
        )


@task(name="evaluate-stage")
def evaluate_task(cfg: PipelineConfig, store_root: str, upstream: dict[str, str], force: bool = False) -> StageResult:
    """Build (or reuse) the evaluation artifact: metric tables and pictures, also shown in the run's artifacts."""
    store = Store(store_root)
    with observed():
        result = run_stage(store, cfg, "evaluate", upstream, lambda files: build_evaluate(cfg, store, upstream, files), force)
        publish_metrics(cfg, store, result.key, upstream)
        publish_pictures(cfg, store, result.key)
    return result
