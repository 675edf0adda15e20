"""Masks for people's own images and for whole dataset splits, from a trained student in the store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clips4.config import EvaluateConfig
from clips4.data.datasets import IMAGE_SUFFIXES, distinct_palette
from clips4.data.io import BadImageError, check_pixels, read_image, write_png
from clips4.data.records import IGNORE_INDEX
from clips4.device import resolve_device
from clips4.inference import Segmenter, parse_class_names
from clips4.progress import track
from clips4.sampling import strided
from clips4.visualize import blend_labels, share_bars
from clips4.storage import Store, StoreError
from clips4.calibration import new_class_floor, new_class_ids
from clips4.evaluation import array_embedder
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


@dataclass(frozen=True)
class Segmented:
    """What a segment or export run wrote, and the stored artifacts (keys) whose student and teacher made it."""

    masks: list[Path]
    student: str
    teacher: str


def load_segmenter(store: Store, checkpoint: str | None, device: str = "auto", scales: Sequence[float] = (1.0,),
                   evaluate: EvaluateConfig | None = None) -> tuple[Segmenter, str, str]:
    """The student of a train artifact and its teacher's text tower, with both artifacts' keys; images are embedded
    at each of ``scales`` x the student's training input size and averaged (the evaluate stage's ``test_scales``),
    or under ``evaluate``'s protocol 'whole' or 'slide' at each of ``scales`` x its short side."""
    key = resolve_train_key(store, checkpoint)
    dev = resolve_device(device)
    trained = TrainArtifact.open(store, key)
    model = trained.student(dev)
    teacher_key = store.ancestor(key, "teacher")
    if teacher_key is None:
        raise StoreError(f"the teacher that {key} was trained against is not in {store.root}; its text tower names classes")
    teacher = load_teacher(store.open(teacher_key), dev)
    segmenter = Segmenter(model, teacher, dev, trained.centre(), scales, evaluate or EvaluateConfig())
    return segmenter, key, teacher_key


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
        strided(len(records)), batch_size=batch_size, text=text, centre=segmenter.centre, new=new,
        names=[" | ".join(n) for n in names], floor=floor, pixels=defaults.calibration_pixels, seed=defaults.seed,
        device=segmenter.device,
    )
    table.to_csv(out / "calibration.csv", index=False)
    share_bars(table, out / "calibration.png")
    return bias


def write_masks(out: Path, stem: str, image: np.ndarray, label: np.ndarray, palette: np.ndarray,
                num_classes: int) -> Path:
    """``<stem>_labels.png`` (raw class ids), ``<stem>_mask.png`` (class colours) and ``<stem>_overlay.png``;
    returns the mask's path. ``stem`` may hold folders.

    Up to 255 classes the ids are 8-bit and the mask is a palette PNG whose indices are the ids. With more, the ids
    are a 16-bit PNG (255 is the ignore value of 8-bit label maps, and ids past it do not fit) and the mask is an RGB
    PNG (a palette holds 256 colours)."""
    mask = out / f"{stem}_mask.png"
    if num_classes <= IGNORE_INDEX:
        ids = label.astype(np.uint8)
        write_png(mask, ids, palette=palette)
        write_png(out / f"{stem}_labels.png", ids)
    else:
        write_png(out / f"{stem}_labels.png", label.astype(np.uint16))
        write_png(mask, np.asarray(palette, dtype=np.uint8)[label])
    write_png(out / f"{stem}_overlay.png", blend_labels(image, label, palette, ignore_index=-1))  # no pixel ignored
    return mask


def collect_images(inputs: Sequence[Path], out: Path) -> list[tuple[Path, str]]:
    """Each image of ``inputs`` with the output stem that mirrors its path, so no output overwrites another.

    Stems are paths relative to the deepest folder that holds every input (a folder input counts as itself), without
    suffix. Folders are searched recursively for image files (sorted; other files, hidden ones and anything under
    ``out`` are left alone); a file given twice is segmented once. Raises ValueError, before anything is written, for
    a missing input, a folder without images, or two images that would write the same outputs."""
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise ValueError(f"no such image file or folder: {', '.join(missing)}")
    inputs = [p.resolve() for p in inputs]
    root = Path(os.path.commonpath([p if p.is_dir() else p.parent for p in inputs]))
    skip = out.resolve()
    found: dict[Path, None] = {}  # ordered and without repeats
    for given in inputs:
        if not given.is_dir():
            found[given] = None
            continue
        images = sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(given).parts)
                        and not p.is_relative_to(skip))
        if not images:
            raise ValueError(f"folder {given} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        found.update(dict.fromkeys(images))
    stems: dict[str, tuple[Path, str]] = {}
    for path in found:
        stem = path.relative_to(root).with_suffix("").as_posix()
        other, _ = stems.setdefault(stem.casefold(), (path, stem))  # casefold: macOS and Windows ignore case
        if other != path:
            raise ValueError(f"{other} and {path} would both write {out / stem}_*.png; rename one of them or "
                             "segment them in separate runs")
    return list(stems.values())


def _unusable(err: BadImageError) -> ValueError:
    """A user's bad image, with the remedy that fits ``clips4 segment`` (not the data stage's data.on_bad_input)."""
    return ValueError(f"{err.path}: {err.problem}; fix it or leave it out of the inputs")


def _read_input(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except BadImageError as err:
        raise _unusable(err) from None


def segment_files(
    store: Store, images: list[Path], classes: str, out: Path, checkpoint: str | None = None, device: str = "auto",
    batch_size: int = 8, scales: Sequence[float] = (1.0,), new_class_floor: float = 0.0,
    max_pixels: int | None = None, evaluate: EvaluateConfig | None = None,
) -> Segmented:
    """Segment the user's images (files, or folders searched recursively) into the named classes, each under
    ``out`` at its path relative to the inputs (:func:`collect_images`), seen as ``evaluate``'s protocol says
    (:func:`load_segmenter`). Names the student was not trained on get the share floor ``new_class_floor``
    (:func:`new_class_bias`). Every input is checked before the model loads: it must exist, map to its own outputs,
    and have at most ``max_pixels`` pixels (None: no limit)."""
    sources = collect_images(images, out)
    try:
        for path, _ in sources:
            check_pixels(path, max_pixels, "--max-pixels or pass 0 for no limit")
    except BadImageError as err:
        raise _unusable(err) from None
    names = parse_class_names(classes)
    segmenter, key, teacher_key = load_segmenter(store, checkpoint, device, scales, evaluate)
    text = segmenter.class_embeddings(names)
    palette = distinct_palette(len(names))
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{i}\t{' | '.join(n)}\n" for i, n in enumerate(names)))
    bias = new_class_bias(store, key, segmenter, text, names, new_class_floor, batch_size, out)
    written = []
    for start in track(range(0, len(sources), batch_size), "segmenting", unit="batch"):
        batch = sources[start : start + batch_size]
        pixels = [_read_input(path) for path, _ in batch]
        for (_, stem), image, label in zip(batch, pixels, segmenter(pixels, text, batch_size, bias)):
            written.append(write_masks(out, stem, image, label, palette, len(names)))
    return Segmented(written, key, teacher_key)


def export_split(store: Store, split: str, out: Path, checkpoint: str | None = None, device: str = "auto",
                 batch_size: int = 8, scales: Sequence[float] = (1.0,), new_class_floor: float = 0.0,
                 evaluate: EvaluateConfig | None = None) -> Segmented:
    """Masks of every image of a dataset split, named by image id, with the dataset's class names (held-out ones
    included, with the share floor ``new_class_floor``: :func:`new_class_bias`), seen as ``evaluate``'s protocol
    says (:func:`load_segmenter`)."""
    segmenter, key, teacher_key = load_segmenter(store, checkpoint, device, scales, evaluate)
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
    written = []
    for start in track(range(0, len(records), batch_size), f"exporting {split}", unit="batch"):
        batch = records[start : start + batch_size]
        pixels = [read_image(r.image_path) for r in batch]
        for r, image, label in zip(batch, pixels, segmenter(pixels, text, batch_size, bias)):
            written.append(write_masks(out, r.image_id, image, label, classes.palette, classes.num_classes))
    return Segmented(written, key, teacher_key)
