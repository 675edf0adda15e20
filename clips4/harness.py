"""The evaluation harness: MaskCLIP (the teacher, zero-shot) and CLIP-S4 (the student) in one table.

Usable from a notebook: it takes arrays and callables (:class:`EvalInputs`), an :class:`EvaluateConfig`, and returns
pandas tables (:class:`Results`); the evaluate stage only reads artifacts into it and writes what it returns.

Rows are the named :class:`Method` s of :data:`METHODS`:

- ``maskclip``: MaskCLIP's map as the features stage stored it, plain cosine to the class texts (docs/method.md §6);
- ``maskclip+kspd``: the same map with key smoothing and prompt denoising (language only, ViT teachers);
- ``maskclip+tta``: MaskCLIP with every test-time step that needs no trained student: the test scales
  (``test_scales``), the modality gap re-centred on the classes named from MaskCLIP's own centre (``recentre_gap``)
  and the held-out share floor (``new_class_floor``);
- ``clips4``: the student as trained: one scale, plain cosine to the named texts;
- ``clips4+tta``: the student with the same test-time steps (re-centred from the centre the train stage measured).

A +tta row is left out where none of its steps applies, since it would repeat its plain row. Re-centring and the
floor act on class scores, so on the unsupervised and probe tasks a +tta row differs from its plain row by its test
scales only. Those two tasks see every map resized (bilinear) to one ``grid`` x ``grid``, so MaskCLIP's coarse map
and the student's finer one are clustered and probed at the same output resolution; the language task scores each
map at its own size, upsampled to each label's size.

``evaluate.protocol`` says how the language task's models see an image (:mod:`clips4.protocol`): ``stored`` reads the
maps above; ``whole`` and ``slide`` run MaskCLIP and the student on the image resized keeping its aspect ratio,
whole or by sliding windows, scores resized to each label's original size, as published tables do. With
``evaluate.background`` ``threshold`` class 0 is a background without text, predicted where no other class is
confident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from clips4.calibration import new_class_floor
from clips4.config import EvaluateConfig
from clips4.data.records import IGNORE_INDEX
from clips4.evaluation import (
    Embedder,
    array_embedder,
    language_logits,
    resize_labels,
    score_classifier,
    train_linear_probe,
    unsupervised_segmentation,
)
from clips4.inference import embed_multiscale, embedding_centre, scales_label
from clips4.maskclip import extract_dense, input_stride, maskclip_logits
from clips4.metrics import ConfusionMatrix, segmentation_scores
from clips4.progress import track
from clips4.protocol import predict_labels, protocol_scores
from clips4.sampling import strided
from clips4.student import PixelEncoder
from clips4.teacher import Teacher
from clips4.data.prepare import normalize_images, to_unit_images

Model = Literal["maskclip", "clips4"]
Task = Literal["language", "unsupervised", "probe"]
Step = Literal["scales", "recentre", "floor"]
SplitName = Literal["evaluated", "train"]
TASKS: tuple[Task, ...] = ("language", "unsupervised", "probe")
TEST_TIME: frozenset[Step] = frozenset({"scales", "recentre", "floor"})
SCORES = ("mIoU", "mIoU_known", "mIoU_unknown", "hIoU", "pAcc")  # language; the other tasks report mIoU and pAcc

Encoder = Callable[[np.ndarray], torch.Tensor]
"""uint8 RGB images [B,H,W,3] of one size -> dense maps [B,D,h,w]."""


@dataclass(frozen=True)
class Method:
    """One row of the table: whose map it scores and which test-time steps it takes."""

    model: Model
    steps: frozenset[Step] = frozenset()
    kspd: bool = False  # MaskCLIP's key smoothing + prompt denoising on its stored map and keys


METHODS: dict[str, Method] = {
    "maskclip": Method("maskclip"),
    "maskclip+kspd": Method("maskclip", kspd=True),
    "maskclip+tta": Method("maskclip", TEST_TIME),
    "clips4": Method("clips4"),
    "clips4+tta": Method("clips4", TEST_TIME),
}


@dataclass(frozen=True)
class DenseModel:
    """An encoder and the side ``size`` it takes images at at test scale 1 (MaskCLIP: the features stage's
    resolution; the student: its training input); test scales multiply it (:func:`embed_multiscale`). Input sides
    must be multiples of ``multiple`` (MaskCLIP's patch; the student takes any side)."""

    encode: Encoder
    size: int
    multiple: int = 1


def maskclip_model(teacher: Teacher, *, size: int, device: torch.device, batch_size: int = 16,
                   amp: bool = False) -> DenseModel:
    """MaskCLIP's dense map of ``teacher``, computed as the features stage stores it (keys aside)."""
    mean, std = torch.tensor(teacher.mean), torch.tensor(teacher.std)

    def encode(images: np.ndarray) -> torch.Tensor:
        x = normalize_images(to_unit_images(images, torch.device("cpu")), mean, std)
        dense = extract_dense(teacher.model, x, batch_size, device, amp, with_keys=False)
        return dense.features.permute(0, 3, 1, 2).float()

    return DenseModel(encode, size, input_stride(teacher.model))


def student_model(student: PixelEncoder, *, batch_size: int = 16) -> DenseModel:
    """A trained student's unit embeddings, at its training input side and with its own normalisation."""
    return DenseModel(lambda images: student.embed(images, batch_size), student.preprocessing.input_size)


@dataclass(frozen=True)
class Split:
    """A split as the harness reads it, by image index: uint8 RGB images, int labels (255 = ignore) and MaskCLIP's
    stored map ``features`` [N,h,w,D] (a Zarr array or any array indexable by image), with its last-block ``keys``
    [N,h,w,C] when kept (for ``maskclip+kspd``)."""

    image: Callable[[int], np.ndarray]
    label: Callable[[int], np.ndarray]
    features: Any
    keys: Any = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class EvalInputs:
    """What is evaluated: the ``evaluated`` split (evaluate.split); the ``train`` split (probe, share floor,
    MaskCLIP's centre) when there is one; the class texts [K,D] (held-out names included), names and held-out
    indices; MaskCLIP as an encoder (``teacher``, needed for test scales other than [1]); the ``student`` and its
    embedding centre [D] (:func:`clips4.inference.embedding_centre`, None when it was not trained on the text side
    of the gap)."""

    evaluated: Split
    text: torch.Tensor
    names: Sequence[str]
    held_out: Sequence[int]
    train: Split | None = None
    teacher: DenseModel | None = None
    student: DenseModel | None = None
    student_centre: torch.Tensor | None = None


@dataclass
class Results:
    """The tables of one evaluation. ``metrics``: method, task, metric, value (tidy); ``per_class``: method, task,
    class, held_out, iou; ``summary``: :func:`summary_table`; ``calibration``: the share floor per class (None
    without one)."""

    metrics: pd.DataFrame
    per_class: pd.DataFrame
    summary: pd.DataFrame
    calibration: pd.DataFrame | None


@dataclass
class _Batches:
    """Re-iterable (maps [1,D,h,w], labels [1,H,W]), one image at a time (label sizes may differ), maps resized
    to ``grid`` x ``grid`` when given. Memory holds one image whatever the split's size."""

    split: Split
    embed: Embedder
    grid: int | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self.split)):
            emb = self.embed([i])
            yield (emb if self.grid is None else to_grid(emb, self.grid)), _label(self.split, i)


def _label(split: Split, i: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(split.label(i)).astype(np.int64))[None]


def to_grid(emb: torch.Tensor, grid: int) -> torch.Tensor:
    """Maps [B,D,h,w] resized (bilinear) to ``grid`` x ``grid``: the one output resolution of the unsupervised and
    probe tasks, whatever each method's own map size."""
    if tuple(emb.shape[-2:]) == (grid, grid):
        return emb
    return F.interpolate(emb.float(), size=(grid, grid), mode="bilinear", align_corners=False)


@dataclass
class Harness:
    """Scores every row of :data:`METHODS` that applies to ``inputs`` on ``cfg.tasks``.

    Maps other than MaskCLIP's stored one are computed once per split and cached, float16 [N,h,w,D], in
    ``workdir`` (memory-mapped ``.npy`` files; in memory when None), since each task reads them again; so are the
    train split's labels on the common grid, which every probe row reads once per epoch."""

    inputs: EvalInputs
    cfg: EvaluateConfig
    device: torch.device
    workdir: Path | None = None
    _maps: dict[tuple[Model, tuple[float, ...], SplitName], Embedder] = field(default_factory=dict, init=False)
    _bias: dict[str, torch.Tensor] = field(default_factory=dict, init=False)
    _shares: dict[str, pd.DataFrame] = field(default_factory=dict, init=False)
    _maskclip_centre: torch.Tensor | None = field(default=None, init=False)
    _labels: dict[SplitName, np.ndarray] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        names = self.inputs.names
        if self.cfg.background == "threshold" and (len(names) < 2 or names[0].strip().lower() != "background"):
            raise ValueError(
                f"evaluate.background 'threshold' predicts class 0 as the background, but class 0 of this dataset is "
                f"{names[0] if names else None!r}; evaluate a dataset whose class 0 is 'background' (and that has "
                "other classes), or set evaluate.background=ignore"
            )

    @property
    def named(self) -> slice:
        """The classes scored against their texts: every class, or all but class 0 with a thresholded background."""
        return slice(1, None) if self.cfg.background == "threshold" else slice(None)

    # ------------------------------------------------------------------------------------------------ which rows
    def steps(self, name: str, task: Task) -> frozenset[Step]:
        """The test-time steps of method ``name`` that apply on ``task`` with these inputs and settings."""
        method, c, inputs = METHODS[name], self.cfg, self.inputs
        applicable: set[Step] = set()
        if list(c.test_scales) != [1.0]:
            applicable.add("scales")
        if task == "language" and c.recentre_gap and (method.model == "maskclip" or inputs.student_centre is not None):
            applicable.add("recentre")
        if task == "language" and c.new_class_floor > 0 and inputs.held_out and inputs.train is not None:
            applicable.add("floor")
        return method.steps & applicable

    def rows(self, task: Task) -> list[str]:
        """The methods scored on ``task``, in registry order."""
        if task not in self.cfg.tasks or (task == "probe" and self.inputs.train is None):
            return []
        return [
            name for name, m in METHODS.items()
            if (m.model == "maskclip" or self.inputs.student is not None)
            and (not m.kspd or (task == "language" and self.inputs.evaluated.keys is not None
                                and self.cfg.protocol == "stored" and self.cfg.background == "ignore"))
            and (not m.steps or self.steps(name, task))
        ]

    # ------------------------------------------------------------------------------------------------------ maps
    def _split(self, split: SplitName) -> Split:
        data = self.inputs.evaluated if split == "evaluated" else self.inputs.train
        if data is None:
            raise ValueError(f"no {split} split given to the harness")
        return data

    def _scales(self, name: str) -> tuple[float, ...]:
        return tuple(self.cfg.test_scales) if "scales" in METHODS[name].steps else (1.0,)

    def embedder(self, model: Model, scales: tuple[float, ...], split: SplitName) -> Embedder:
        """``model``'s maps of a split's images averaged over ``scales`` (MaskCLIP at (1,): its stored map)."""
        key = (model, scales, split)
        if key not in self._maps:
            data = self._split(split)
            if model == "maskclip" and scales == (1.0,):
                self._maps[key] = array_embedder(data.features)
            else:
                dense = self.inputs.teacher if model == "maskclip" else self.inputs.student
                if dense is None:
                    raise ValueError(f"{model} at test scales {scales_label(scales)} needs its encoder in EvalInputs")
                encode = partial(embed_multiscale, dense.encode, size=dense.size, scales=scales)
                self._maps[key] = array_embedder(self._cache(f"{model}@{scales_label(scales)}-{split}", encode, data))
        return self._maps[key]

    def _cache(self, name: str, encode: Callable[[list[np.ndarray]], torch.Tensor], split: Split):
        out = None
        size = self.cfg.batch_size
        for start in track(range(0, len(split), size), f"embedding {name}", unit="batch"):
            idx = range(start, min(start + size, len(split)))
            emb = encode([split.image(i) for i in idx]).permute(0, 2, 3, 1).numpy().astype(np.float16)
            if out is None:
                out = self._array(name, (len(split), *emb.shape[1:]), np.float16)
            out[idx.start : idx.stop] = emb
        return out

    def _array(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """An array to fill once and read again: a memory-mapped ``.npy`` file in ``workdir``, in memory without."""
        if self.workdir is None:
            return np.empty(shape, dtype)
        self.workdir.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(self.workdir / f"{name}.npy", "w+", dtype, shape)

    def _grid_labels(self, split: SplitName) -> np.ndarray:
        """A split's labels int16 [N,grid,grid], resized (nearest) to the common grid once per harness."""
        if split not in self._labels:
            data, size = self._split(split), (self.cfg.grid, self.cfg.grid)
            out = self._array(f"labels@{self.cfg.grid}-{split}", (len(data), *size), np.int16)
            for i in track(range(len(data)), f"labels of {split} on the grid", unit="image"):
                out[i] = resize_labels(_label(data, i), size)[0].numpy()
            self._labels[split] = out
        return self._labels[split]

    def maps(self, name: str, split: SplitName = "evaluated") -> Embedder:
        """What method ``name`` scores on a split: its maps, or for ``maskclip+kspd`` its class scores."""
        if METHODS[name].kspd:
            return self._kspd(self._split(split))
        return self.embedder(METHODS[name].model, self._scales(name), split)

    def _kspd(self, split: Split) -> Embedder:
        text = self.inputs.text.cpu()

        def scores(idx: list[int]) -> torch.Tensor:
            rows = slice(idx[0], idx[-1] + 1)
            f = torch.from_numpy(np.asarray(split.features[rows])).float()
            k = torch.from_numpy(np.asarray(split.keys[rows])).float()
            return maskclip_logits(f, text, keys=k, key_smoothing=True, prompt_denoise=True)

        return scores

    # ------------------------------------------------------------------------------------------------ class scores
    def centre(self, model: Model) -> torch.Tensor | None:
        """Where ``model``'s unit embeddings sit [D], the point re-centring moves to the named classes' mean text:
        MaskCLIP's is the mean of its stored image features (the train split's when given); the student's was
        measured by the train stage."""
        if model == "clips4":
            return self.inputs.student_centre
        if self._maskclip_centre is None:
            features = (self.inputs.train or self.inputs.evaluated).features
            as_maps = lambda rows: torch.from_numpy(np.asarray(rows)).float().permute(0, 3, 1, 2)  # noqa: E731
            self._maskclip_centre = embedding_centre(as_maps, features)
        return self._maskclip_centre

    def classifier(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The language task's scores [B,K',h,w] of embeddings [B,D,h,w] of ``name``'s model (what :meth:`maps`
        gives), one per class with a text (:attr:`named`)."""
        if METHODS[name].kspd:
            return lambda scores: scores
        steps = self.steps(name, "language")
        centre = self.centre(METHODS[name].model) if "recentre" in steps else None
        bias = self._floor(name, centre) if "floor" in steps else None
        return partial(language_logits, weights=self.inputs.text[self.named].to(self.device), centre=centre, bias=bias)

    def _floor(self, name: str, centre: torch.Tensor | None) -> torch.Tensor:
        """The held-out share floor of ``name`` (:func:`clips4.calibration.new_class_floor`), measured once. The
        student's columns keep the names ``clips4 segment`` writes; MaskCLIP's carry the row's name. It is measured
        on the stored maps of the train split whatever ``evaluate.protocol``, over the classes with a text."""
        if name not in self._bias:
            c, inputs, first = self.cfg, self.inputs, self.named.start or 0
            student = METHODS[name].model == "clips4"
            bias, table = new_class_floor(
                self.embedder("maskclip", (1.0,), "train"), self.maps(name, "train"),
                strided(len(self._split("train"))), batch_size=c.batch_size,
                text=inputs.text[self.named].to(self.device), centre=centre,
                new=[k - first for k in inputs.held_out if k >= first], names=list(inputs.names)[self.named],
                floor=c.new_class_floor, pixels=c.calibration_pixels, seed=c.seed, device=self.device,
                name="clips4" if student else name,
            )
            self._bias[name] = bias
            self._shares[name] = table if student else table.rename(columns={"bias": f"{name}_bias"})
        return self._bias[name]

    def labeller(self, name: str) -> Callable[[int, tuple[int, int]], torch.Tensor]:
        """Method ``name``'s language labels int64 [1,H,W] of an evaluated image, by index, at size (H, W): its class
        scores under ``evaluate.protocol`` (:func:`clips4.protocol.protocol_scores` for 'whole' and 'slide', the
        +tta rows' test scales multiplying the short side), resized to that size, then the argmax or the thresholded
        background (:func:`clips4.protocol.predict_labels`)."""
        c, split, classify = self.cfg, self.inputs.evaluated, self.classifier(name)
        threshold = c.background_threshold if c.background == "threshold" else None
        if c.protocol == "stored":
            maps = self.maps(name)

            def scores(i: int, size: tuple[int, int]) -> torch.Tensor:
                return classify(maps([i]).to(self.device))
        else:
            model = METHODS[name].model
            dense = self.inputs.teacher if model == "maskclip" else self.inputs.student
            if dense is None:
                raise ValueError(f"{model} under protocol {c.protocol!r} needs its encoder in EvalInputs")
            scales, num_classes = self._scales(name), len(self.inputs.names[self.named])

            def score(windows: np.ndarray) -> torch.Tensor:
                return classify(dense.encode(windows).to(self.device))

            def scores(i: int, size: tuple[int, int]) -> torch.Tensor:
                return protocol_scores(score, split.image(i), size, c, num_classes, scales, multiple=dense.multiple,
                                       batch_size=c.batch_size)

        return lambda i, size: predict_labels(scores(i, size), size, threshold)

    @torch.no_grad()
    def predict(self, name: str, index: int) -> np.ndarray:
        """Method ``name``'s language label map int [H,W] of image ``index`` of the evaluated split, at its label's
        size."""
        size = np.asarray(self.inputs.evaluated.label(index)).shape[:2]
        return self.labeller(name)(index, size)[0].cpu().numpy()

    # ---------------------------------------------------------------------------------------------------- scoring
    def score(self, name: str, task: Task) -> dict:
        """Scores of method ``name`` on ``task`` (see :func:`clips4.metrics.segmentation_scores`)."""
        c, num_classes = self.cfg, len(self.inputs.names)
        if task == "language":
            return self._language(name)
        if task == "unsupervised":
            return unsupervised_segmentation(_Batches(self.inputs.evaluated, self.maps(name), c.grid), num_classes,
                                             self.device, c.seed).scores
        return self._probe(name)

    @torch.no_grad()
    def _language(self, name: str) -> dict:
        """Language scores of ``name``: one confusion matrix over the evaluated split, each image labelled at its
        label's size (:meth:`labeller`)."""
        split, labels_of = self.inputs.evaluated, self.labeller(name)
        confusion = ConfusionMatrix(len(self.inputs.names), IGNORE_INDEX)
        for i in track(range(len(split)), f"scoring {name}", unit="image"):
            label = _label(split, i).to(self.device)
            confusion.update(labels_of(i, tuple(label.shape[-2:])), label)
        return segmentation_scores(confusion.matrix, self.inputs.held_out)

    def _probe(self, name: str) -> dict:
        """Linear probe on the train split's frozen maps and labels, both on the common grid, streamed a batch at a
        time (:func:`clips4.evaluation.train_linear_probe`), scored on the evaluated split."""
        c, num_classes = self.cfg, len(self.inputs.names)
        embed, labels = self.maps(name, "train"), self._grid_labels("train")

        def read(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # resized on the device: once per epoch
            return to_grid(embed(idx).to(self.device), c.grid), torch.from_numpy(labels[idx])

        probe = train_linear_probe(read, len(labels), num_classes, c.probe_epochs, c.probe_lr, c.seed, self.device)
        batches = _Batches(self.inputs.evaluated, self.maps(name), c.grid)
        with torch.no_grad():
            return score_classifier(batches, probe, num_classes, self.device)[0]

    def run(self) -> Results:
        """Every applicable (method, task) of the table, method by method."""
        held = set(self.inputs.held_out)
        rows: list[dict] = []
        per_class: list[pd.DataFrame] = []
        for name in METHODS:
            for task in TASKS:
                if name not in self.rows(task):
                    continue
                scores = self.score(name, task)
                reported = SCORES if task == "language" else ("mIoU", "pAcc")
                rows += [{"method": name, "task": task, "metric": m, "value": float(scores[m])}
                         for m in reported if m in scores]
                per_class.append(pd.DataFrame({
                    "method": name, "task": task, "class": list(self.inputs.names),
                    "held_out": [k in held for k in range(len(self.inputs.names))], "iou": scores["per_class_iou"],
                }))
        metrics = pd.DataFrame(rows, columns=["method", "task", "metric", "value"])
        shares = list(self._shares.values())
        calibration = None
        if shares:
            shared = ["class", "held_out", "maskclip_share"]
            calibration = pd.concat([shares[0], *(t.drop(columns=shared) for t in shares[1:])], axis=1)
        per_class_table = pd.concat(per_class, ignore_index=True) if per_class else pd.DataFrame(
            columns=["method", "task", "class", "held_out", "iou"])
        return Results(metrics, per_class_table, summary_table(metrics), calibration)


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric of a tidy metrics table: the best MaskCLIP row (``maskclip_best``, its value
    ``maskclip_best_value``), and for each clips4 row its value and its gain over that best in points
    (``<row>_gain`` = 100 x the difference). The bar a student has to clear is the strongest teacher row, whichever
    test-time steps that takes."""
    model = metrics["method"].map(lambda m: METHODS[m].model)
    baseline = metrics[model == "maskclip"].dropna(subset=["value"])
    best = baseline.loc[baseline.groupby(["task", "metric"], sort=False)["value"].idxmax()]
    out = best.rename(columns={"method": "maskclip_best", "value": "maskclip_best_value"})
    out = out[["task", "metric", "maskclip_best", "maskclip_best_value"]].reset_index(drop=True)
    for name in pd.unique(metrics.loc[model == "clips4", "method"]):
        mine = metrics.loc[metrics["method"] == name, ["task", "metric", "value"]].rename(columns={"value": name})
        out = out.merge(mine, on=["task", "metric"], how="left")
        out[f"{name}_gain"] = 100 * (out[name] - out["maskclip_best_value"])
    return out
