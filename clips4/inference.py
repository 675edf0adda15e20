"""Segmentation of new images with a trained student, for any class names given at query time (class-free)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from clips4.config import MAX_TEST_SCALE, MIN_TEST_SCALE, EvaluateConfig
from clips4.data.prepare import resize_square
from clips4.evaluation import language_logits, predict_language
from clips4.maskclip import prompt_templates, text_embeddings
from clips4.progress import track
from clips4.protocol import protocol_scores
from clips4.sampling import STATISTICS_IMAGES, strided
from clips4.student import PixelEncoder
from clips4.teacher import Teacher

if TYPE_CHECKING:
    import zarr

CENTRE_BATCH = 64  # images per forward pass while measuring the embedding centre


def parse_class_names(text: str) -> list[list[str]]:
    """``"cat, dog | puppy, grass"`` -> [["cat"], ["dog", "puppy"], ["grass"]] (``|`` separates synonyms)."""
    classes = [[s.strip() for s in item.split("|") if s.strip()] for item in text.split(",")]
    classes = [c for c in classes if c]
    if not classes:
        raise ValueError("--classes needs at least one class name, e.g. --classes 'cat, dog, grass'")
    return classes


def scaled_size(size: int, scale: float) -> int:
    """The side an image is resized to at test scale ``scale``, for a model run at side ``size`` (at least 1)."""
    return max(1, round(size * scale))


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """The test scales as a tuple, or a ValueError naming what is wrong with them."""
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("give at least one test scale, e.g. 2 (the demo evaluates at 2, 3 and 4)")
    bad = [s for s in scales if not MIN_TEST_SCALE <= s <= MAX_TEST_SCALE]
    if bad:
        raise ValueError(f"test scales must lie in [{MIN_TEST_SCALE:g}, {MAX_TEST_SCALE:g}], got {', '.join(f'{s:g}' for s in bad)}")
    return scales


def scales_label(scales: Sequence[float]) -> str:
    """``(2, 3, 4)`` -> ``"2+3+4x"``: the suffix of a table row embedded at those scales."""
    return "+".join(f"{s:g}" for s in scales) + "x"


def embed_multiscale(embed: Callable[[np.ndarray], torch.Tensor], images: Sequence[np.ndarray], size: int,
                     scales: Sequence[float]) -> torch.Tensor:
    """Embeddings float32 [B,D,h,w] of uint8 RGB ``images`` (any sizes), averaged over input scales.

    For each scale s every image is resized to ``scaled_size(size, s)`` and embedded by ``embed`` (uint8
    [B,S,S,3] -> [B,D,h',w']); the unit embeddings are resized (bilinear) to the first scale's grid, averaged
    and re-normalised. A small thing that a few pixels of one scale cannot name gets more at a larger one, while
    the first scale fixes the map's resolution, so the stored embeddings do not grow with the largest scale.
    """
    total, grid = None, None
    for scale in check_scales(scales):
        side = scaled_size(size, scale)
        emb = F.normalize(embed(np.stack([resize_square(im, side) for im in images])).float(), dim=1)
        if grid is None:
            grid = emb.shape[-2:]
        elif emb.shape[-2:] != grid:
            emb = F.interpolate(emb, size=grid, mode="bilinear", align_corners=False)
        total = emb if total is None else total + emb
    return F.normalize(total, dim=1)


def student_embedder(student: PixelEncoder, batch_size: int,
                     scales: Sequence[float]) -> Callable[[Sequence[np.ndarray]], torch.Tensor]:
    """uint8 RGB images (any sizes) -> the student's unit embeddings [B,D,h,w], averaged over ``scales`` x its
    training input side (:func:`embed_multiscale`)."""
    size = student.preprocessing.input_size
    return lambda images: embed_multiscale(lambda x: student.embed(x, batch_size), images, size, scales)


@torch.no_grad()
def embedding_centre(embed: Callable[[np.ndarray], torch.Tensor], images: np.ndarray | zarr.Array,
                     max_images: int = STATISTICS_IMAGES, batch_size: int = CENTRE_BATCH) -> torch.Tensor:
    """Mean [D], over every pixel, of the unit embeddings ``embed`` gives at most ``max_images`` of ``images``
    [N,H,W,3] (evenly strided): where a student's embeddings actually sit, the point
    :func:`clips4.evaluation.language_logits` re-centres from. ``images`` is read one batch at a time, so it may be
    a lazy Zarr array."""
    if images.shape[0] == 0:
        raise ValueError("the embedding centre needs at least one image")
    picked = strided(images.shape[0], max_images)
    total, pixels = None, 0
    for start in track(range(0, len(picked), batch_size), "embedding centre", unit="batch"):
        chunk = picked[start : start + batch_size]
        emb = F.normalize(embed(images[chunk.start : chunk.stop : chunk.step]).float(), dim=1)
        part = emb.sum(dim=(0, 2, 3))
        total = part if total is None else total + part
        pixels += emb.shape[0] * emb.shape[2] * emb.shape[3]
    return total / pixels


@dataclass
class Segmenter:
    """A student and the teacher's text tower: names -> text embeddings -> per-pixel nearest class."""

    student: PixelEncoder  # its training input side is the one test scales multiply
    teacher: Teacher
    device: torch.device
    centre: torch.Tensor | None = None  # the student's embedding centre; see clips4.evaluation.language_logits
    scales: Sequence[float] = (1.0,)
    # How images are seen: its protocol, short_side, crop and stride, as the evaluate stage's language task
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        self.scales = check_scales(self.scales)

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 16) -> torch.Tensor:
        """Student embeddings [B,D,h,w] of uint8 RGB images, averaged over the test scales (:func:`embed_multiscale`)."""
        return student_embedder(self.student, batch_size, self.scales)(images)

    @torch.no_grad()
    def class_embeddings(self, synonyms: list[list[str]]) -> torch.Tensor:
        return text_embeddings(self.teacher.model, self.teacher.tokenizer, synonyms, prompt_templates()).to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], text: torch.Tensor, batch_size: int = 16,
                 bias: torch.Tensor | None = None) -> list[np.ndarray]:
        """Label maps int [H,W] (each image's own size) for uint8 RGB images of any sizes; ``bias`` [K] is added
        to the class scores (the share floor of classes the student was not trained on). Under protocol 'whole' or
        'slide' (:func:`clips4.protocol.protocol_scores`) the test scales multiply the short side."""
        out: list[np.ndarray] = []
        if self.evaluate.protocol != "stored":
            def score(windows: np.ndarray) -> torch.Tensor:
                emb = self.student.embed(windows, batch_size)
                return language_logits(emb.to(self.device), text, self.centre, bias)

            for im in images:
                scores = protocol_scores(score, im, im.shape[:2], self.evaluate, len(text), self.scales,
                                         batch_size=batch_size)
                out.append(scores.argmax(dim=1)[0].cpu().numpy())
            return out
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            for e, im in zip(self.embed(batch, batch_size), batch):
                label = predict_language(e[None].to(self.device), text, im.shape[:2], self.centre, bias)
                out.append(label[0].cpu().numpy())
        return out
