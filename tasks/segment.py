"""Masks for people's own images and for whole dataset splits, from a trained student in the store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clips4.config import EvaluateConfig
from clips4.data.datasets import distinct_palette
from clips4.data.io import read_image, write_png
from clips4.device import resolve_device
from clips4.inference import Segmenter, parse_class_names, strided
from clips4.progress import track
from clips4.visualize import blend_labels, share_bars
from clips4.storage import Store, StoreError
from clips4.tasks.calibration import FLOOR_IMAGES, array_embedder, new_class_floor, new_class_ids
from clips4.tasks.readers import DataArtifact, FeaturesArtifact, TrainArtifact, load_teacher


def resolve_train_key(store: Store, checkpoint: str | None) -> str:
    """A train artifact key, a path to a train artifact folder, or None for the newest train artifact."""
    if checkpoint is None:
        trained = store.list("train")
        if not trained:
            raise StoreError(f"no trained student in {store.root}; run `clips4 run --preset demo` first or pass --checkpoint")
        return trained[-1].key
    path = Path(checkpoint)
    if path.is_dir():
        return path.resolve().name
    return checkpoint


def load_segmenter(store: Store, checkpoint: str | None, device: str = "auto",
                   scales: Sequence[float] = (1.0,)) -> tuple[Segmenter, str]:
    """The student of a train artifact and its teacher's text tower; images are embedded at each of ``scales`` x
    the student's training input size and averaged (the evaluate stage's ``test_scales``)."""
    key = resolve_train_key(store, checkpoint)
    dev = resolve_device(device)
    trained = TrainArtifact.open(store, key)
    model, info = trained.student(dev)
    teacher_key = store.ancestor(key, "teacher")
    if teacher_key is None:
        raise StoreError(f"the teacher that {key} was trained against is not in {store.root}; its text tower names classes")
    teacher = load_teacher(store.open(teacher_key), dev)
    return Segmenter(model, teacher, info["input_size"], info["mean"], info["std"], dev, trained.centre(), scales), key


def new_class_bias(store: Store, key: str, segmenter: Segmenter, text: torch.Tensor, names: list[list[str]],
                   floor: float, batch_size: int, out: Path) -> torch.Tensor | None:
    """The evaluate stage's share floor (``evaluate.new_class_floor``) for the names student ``key`` was not trained
    on, measured on its training images; None when ``floor`` is 0 or every name is known. Writes the shares to
    ``calibration.csv`` and ``calibration.png`` in ``out``."""
    if floor <= 0:
        return None
    data_key, features_key = store.ancestor(key, "data"), store.ancestor(key, "features")
    if data_key is None or features_key is None:
        raise StoreError(f"--new-class-floor measures class shares on the images {key} was trained on, but its data or "
                         f"features artifact is not in {store.root}: rerun those stages or pass --new-class-floor 0")
    data = DataArtifact.open(store, data_key)
    trained_on = [s for s, held in zip(data.classes.synonyms, data.classes.held_out, strict=True) if not held]
    new = new_class_ids(names, trained_on)
    if not new:
        return None
    records = data.records("train")
    features = FeaturesArtifact.open(store, features_key)
    if not records or not features.has_features("train"):
        raise StoreError(f"--new-class-floor needs the train split's images and teacher features, which {data_key} / "
                         f"{features_key} lack; pass --new-class-floor 0")
    defaults = EvaluateConfig()
    bias, table = new_class_floor(
        array_embedder(features.features("train")),
        lambda idx: segmenter.embed([read_image(records[i].image_path) for i in idx], batch_size),
        strided(len(records), FLOOR_IMAGES), batch_size, text, segmenter.centre, new,
        [" | ".join(n) for n in names], floor, defaults.calibration_pixels, defaults.seed, segmenter.device,
    )
    table.to_csv(out / "calibration.csv", index=False)
    share_bars(table, out / "calibration.png")
    return bias


def write_masks(out: Path, stem: str, image: np.ndarray, label: np.ndarray, palette: np.ndarray) -> None:
    """``<stem>_mask.png`` (palette PNG), ``<stem>_labels.png`` (raw class ids) and ``<stem>_overlay.png``."""
    ids = label.astype(np.uint8)
    write_png(out / f"{stem}_mask.png", ids, palette=palette)
    write_png(out / f"{stem}_labels.png", ids)
    write_png(out / f"{stem}_overlay.png", blend_labels(image, label, palette))


def segment_files(
    store: Store, images: list[Path], classes: str, out: Path, checkpoint: str | None = None, device: str = "auto",
    batch_size: int = 8, scales: Sequence[float] = (1.0,), new_class_floor: float = 0.0,
) -> list[Path]:
    """Segment the user's images into the named classes; returns the written mask files. Names the student was
    not trained on get the share floor ``new_class_floor`` (:func:`new_class_bias`)."""
    names = parse_class_names(classes)
    segmenter, key = load_segmenter(store, checkpoint, device, scales)
    text = segmenter.class_embeddings(names)
    palette = distinct_palette(len(names))
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{i}\t{' | '.join(n)}\n" for i, n in enumerate(names)))
    bias = new_class_bias(store, key, segmenter, text, names, new_class_floor, batch_size, out)
    written = []
    for start in track(range(0, len(images), batch_size), "segmenting", unit="batch"):
        paths = images[start : start + batch_size]
        pixels = [read_image(p) for p in paths]
        for path, image, label in zip(paths, pixels, segmenter(pixels, text, batch_size, bias)):
            write_masks(out, path.stem, image, label, palette)
            written.append(out / f"{path.stem}_mask.png")
    return written


def export_split(store: Store, split: str, out: Path, checkpoint: str | None = None, device: str = "auto",
                 batch_size: int = 8, scales: Sequence[float] = (1.0,), new_class_floor: float = 0.0) -> int:
    """Masks of every image of a dataset split, with the dataset's class names (held-out ones included, with the
    share floor ``new_class_floor``: :func:`new_class_bias`)."""
    segmenter, key = load_segmenter(store, checkpoint, device, scales)
    data_key = store.ancestor(key, "data")
    if data_key is None:
        raise StoreError(f"the data artifact that {key} was trained on is not in {store.root}; rerun the data stage")
    data = DataArtifact.open(store, data_key)
    records = data.records(split)
    if not records:
        raise StoreError(f"split {split!r} is not in data artifact {data_key}; splits: {', '.join(data.splits)}")
    classes = data.classes
    text = segmenter.class_embeddings(classes.synonyms)
    out.mkdir(parents=True, exist_ok=True)
    bias = new_class_bias(store, key, segmenter, text, classes.synonyms, new_class_floor, batch_size, out)
    for start in track(range(0, len(records), batch_size), f"exporting {split}", unit="batch"):
        batch = records[start : start + batch_size]
        pixels = [read_image(r.image_path) for r in batch]
        for r, image, label in zip(batch, pixels, segmenter(pixels, text, batch_size, bias)):
            write_masks(out, r.image_id, image, label, classes.palette)
    return len(records)
