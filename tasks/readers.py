"""Typed views of stored artifacts, so every stage reads another stage's output one way.

Each stage module writes its artifact's files; the names it uses are the constants here."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Self
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clips4.config import DataConfig, FeaturesConfig
from clips4.data.records import ClassInfo, Record
from clips4.storage import ArtifactFiles, Store
from clips4.student import PixelEncoder, Preprocessing, load_student

CONFIG = "config.yaml"  # every artifact's own config section, written by tasks.common.run_stage
RECORDS = "records"
CLASSES = "classes.json"
REPORT = "report.json"
TRAIN_IMAGES = "train_images.zarr"
TRAIN_REGIONS = "train_regions.zarr"
WORLD = "world"
DONE = ".done"  # staging only: markers of finished image ranges
LAYOUT = "layout.json"  # staging only: the array layout the markers' work was written in

def classes_to_json(classes: ClassInfo, dataset: str) -> dict:
    return {
        "dataset": dataset,
        "synonyms": classes.synonyms,
        "held_out": classes.held_out,
        "palette": np.asarray(classes.palette).tolist(),
        "ignore_index": classes.ignore_index,
    }


def classes_from_json(m: dict) -> ClassInfo:
    return ClassInfo(m["synonyms"], m["held_out"], np.asarray(m["palette"], np.uint8), m["ignore_index"])


@dataclass
class StoredArtifact:
    """Typed read access to one complete artifact's files."""

    files: ArtifactFiles

    @classmethod
    def open(cls, store: Store, key: str) -> Self:
        return cls(store.open(key))


class DataArtifact(StoredArtifact):
    """The data stage's output: records of every split, class metadata, resized training images and regions."""

    @cached_property
    def table(self) -> pd.DataFrame:
        return self.files.read_table(RECORDS)

    @cached_property
    def meta(self) -> dict:
        return self.files.read_json(CLASSES)

    @cached_property
    def classes(self) -> ClassInfo:
        return classes_from_json(self.meta)

    def _abs(self, path: str | None) -> str | None:
        """Files the stage generated (the synthetic world) are stored relative to the artifact."""
        if path is None or (isinstance(path, float) and np.isnan(path)):
            return None
        return path if Path(path).is_absolute() else str(self.files.dir / path)

    def records(self, split: str) -> list[Record]:
        rows = self.table[self.table["split"] == split]
        return [
            Record(r.image_id, r.split, self._abs(r.image_path), self._abs(r.label_path), r.caption)
            for r in rows.itertuples()
        ]

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.table["split"]))

    def label_reader(self, data_cfg: DataConfig) -> Callable[[str], np.ndarray]:
        """The dataset adapter's label decoding (raw files -> train ids, 255 ignore)."""
        from clips4.data.datasets import get_dataset

        root = self.files.dir / WORLD if data_cfg.dataset == "synthetic" else None
        return get_dataset(data_cfg, root).read_label

    def train_images(self):
        return self.files.open_array(TRAIN_IMAGES)

    def train_regions(self):
        return self.files.open_array(TRAIN_REGIONS)

MODEL_DIR = "model"
TEACHER_INFO = "teacher.json"
PROTOTYPES = "prototypes.safetensors"
STUDENT = "student.safetensors"
STUDENT_INFO = "student.json"


def load_teacher(files: ArtifactFiles, device: torch.device):
    """The teacher an artifact describes, loaded through open_clip like any user checkpoint."""
    from clips4.teacher import create_teacher, load_saved_teacher

    if files.has(f"{MODEL_DIR}/open_clip_config.json"):
        return load_saved_teacher(files.file(MODEL_DIR), device)
    info = files.read_json(TEACHER_INFO)
    return create_teacher(info["model"], info["pretrained"], device)


def keys_kept(cfg: FeaturesConfig, split: str) -> bool:
    """Whether the features stage stores ``split``'s keys. Only key smoothing reads them (the ``maskclip+kspd`` row,
    on the evaluated split); the train split, by far the largest, is read by the cluster and train stages and the
    probe without them, so it gets none."""
    return cfg.keep_keys and split != "train"


class FeaturesArtifact(StoredArtifact):
    """Dense teacher features per split (``<split>/features.zarr`` [N,h,w,D], one chunk per image, one shard per
    unit of work), the last block's keys of the splits :func:`keys_kept` names, and the text embeddings of the
    dataset's classes."""

    def create(self, split: str, n: int, side: int, dim: int, key_dim: int | None, dtype: str, shard: int) -> None:
        """The split's arrays with ``shard`` images per Zarr shard file: the unit of work that writes it."""
        for name, d in (("features", dim), ("keys", key_dim)):
            if d:
                self.files.create_array(
                    f"{split}/{name}.zarr", (n, side, side, d), (1, side, side, d), dtype, (shard, side, side, d), compress=False
                )

    def features(self, split: str, mode: str = "r"):
        return self.files.open_array(f"{split}/features.zarr", mode)

    def has_features(self, split: str) -> bool:
        return self.files.has(f"{split}/features.zarr")

    def keys(self, split: str, mode: str = "r"):
        return self.files.open_array(f"{split}/keys.zarr", mode) if self.files.has(f"{split}/keys.zarr") else None

    # Progress of a build in staging: one marker per finished range of images, and the layout the arrays were made
    # with. Markers name image ranges, not shard numbers, so they mean the same whatever shard size wrote them.
    def _marker(self, split: str, lo: int, hi: int) -> str:
        return f"{DONE}/{split}-{lo}-{hi}"

    def range_done(self, split: str, lo: int, hi: int) -> bool:
        return self.files.has(self._marker(split, lo, hi))

    def mark_done(self, split: str, lo: int, hi: int,
                  sealed: dict[str, tuple[int, int, int, str]] | None = None) -> None:
        """Record that images [lo, hi) of ``split`` are written (call only after their arrays are), with what
        :meth:`ArtifactFiles.seal` recorded of the files holding them."""
        self.files.write_json(self._marker(split, lo, hi), {"split": split, "lo": lo, "hi": hi, "sealed": sealed or {}})

    def write_range(self, split: str, lo: int, hi: int, features: np.ndarray, keys: np.ndarray | None) -> None:
        """Write images [lo, hi) of ``split``, seal the Zarr shard files holding them (digested and on disk), then
        mark the range done: a marker never names images a crash or a power cut could still lose."""
        sealed = {}
        for name, values in (("features", features), ("keys", keys)):
            if values is None:
                continue
            array = self.files.open_array(f"{split}/{name}.zarr", mode="r+")
            array[lo:hi] = values
            step = (array.shards or array.chunks)[0]
            for i in range(lo // step, (hi - 1) // step + 1):
                shard = f"{split}/{name}.zarr/{array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))}"
                if self.files.has(shard):  # Zarr writes no file for data that is all fill value; reads give it back
                    sealed[shard] = self.files.seal(shard)
        self.mark_done(split, lo, hi, sealed)

    def _markers(self) -> list[dict]:
        folder = self.files.dir / DONE
        return [json.loads(p.read_text()) for p in (folder.iterdir() if folder.is_dir() else []) if p.suffix != ".tmp"]

    def missing(self, split: str, n: int) -> list[tuple[int, int]]:
        """The ranges of images [0, n) of ``split`` that no marker covers, in order."""
        done = sorted((m["lo"], m["hi"]) for m in self._markers() if m["split"] == split)
        gaps, reached = [], 0
        for lo, hi in done:
            if lo > reached:
                gaps.append((reached, min(lo, n)))
            reached = max(reached, hi)
            if reached >= n:
                break
        if reached < n:
            gaps.append((reached, n))
        return [(lo, hi) for lo, hi in gaps if lo < hi]

    def layout(self) -> dict | None:
        """The array layout a resumable build recorded in staging (None when it recorded none)."""
        return self.files.read_json(LAYOUT) if self.files.has(LAYOUT) else None

    def record_layout(self, layout: dict) -> None:
        self.files.write_json(LAYOUT, layout)

    def clear_progress(self) -> None:
        """Hand publication the digests the shard writers took (a file changed since, by inode, size or mtime, is
        read again), then drop the markers and the layout note: they describe a build, not the artifact it
        publishes. Publication then reads none of the arrays, whichever run or worker wrote them."""
        import shutil

        for marker in self._markers():
            self.files.written.update((rel, tuple(record)) for rel, record in marker.get("sealed", {}).items())
        shutil.rmtree(self.files.dir / DONE, ignore_errors=True)
        self.files.file(LAYOUT).unlink(missing_ok=True)

    @cached_property
    def classes(self) -> ClassInfo:
        return classes_from_json(self.files.read_json(CLASSES))

    def teacher_info(self) -> dict:
        """model, embed_dim, image_size, mean, std of the teacher that made these features."""
        return self.files.read_json(TEACHER_INFO)

    def text(self) -> torch.Tensor | None:
        return self.files.load_tensors("text.safetensors")["text"] if self.files.has("text.safetensors") else None


class TrainArtifact(StoredArtifact):
    """The trained student (safetensors + how to rebuild it) and the final prototypes."""

    @cached_property
    def info(self) -> dict:
        return self.files.read_json(STUDENT_INFO)

    def student(self, device: torch.device) -> PixelEncoder:
        """The trained student, on ``device`` in eval mode; students saved before their weights file carried their
        preprocessing take it from ``student.json``."""
        return load_student(self.files.file(STUDENT), device, Preprocessing.from_dict(self.info))

    @cached_property
    def prototypes(self) -> dict[str, torch.Tensor]:
        """``known`` and ``unknown`` target embeddings at the end of training, the ``gap`` the student's L_emb
        targets were moved by, and the student's embedding ``centre``."""
        return self.files.load_tensors(PROTOTYPES)

    def gap(self) -> torch.Tensor | None:
        """The modality-gap offset [D] the student's L_emb targets were moved by, or None when it was trained
        against CLIP's image features as they are (``train.emb_space: image``, or clustered without the gap)."""
        gap = self.prototypes.get("gap")
        if self.files.read_yaml(CONFIG).get("emb_space") != "text" or gap is None or not bool(gap.any()):
            return None
        return gap.float()

    def centre(self) -> torch.Tensor | None:
        """Where the student's unit embeddings sit [D] (:func:`clips4.inference.embedding_centre` over its training
        images, measured by the train stage), the point clips4.evaluation.language_logits re-centres from; None
        with no gap (its embeddings were never moved towards the known classes' texts)."""
        if self.gap() is None:
            return None
        return self.prototypes["centre"].float()
