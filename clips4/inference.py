"""Segmentation of new images with a trained student, for any class names given at query time (class-free)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clips4.data.prepare import resize_square
from clips4.evaluation import predict_language
from clips4.maskclip import prompt_templates, text_embeddings
from clips4.teacher import Teacher
from clips4.training import embed_images


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


@dataclass
class Segmenter:
    """A student and the teacher's text tower: names -> text embeddings -> per-pixel nearest class."""

    student: torch.nn.Module
    teacher: Teacher
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    trained_centre: torch.Tensor | None = None  # see clips4.evaluation.language_logits

    @torch.no_grad()
    def class_embeddings(self, synonyms: list[list[str]]) -> torch.Tensor:
        return text_embeddings(self.teacher.model, self.teacher.tokenizer, synonyms, prompt_templates()).to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], text: torch.Tensor, batch_size: int = 16) -> list[np.ndarray]:
        """Label maps int [H,W] (each image's own size) for uint8 RGB images of any sizes."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            squares = np.stack([resize_square(im, self.input_size) for im in batch])
            emb = embed_images(self.student, squares, tuple(self.mean), tuple(self.std), self.device, batch_size)
            for e, im in zip(emb, batch):
                label = predict_language(e[None].to(self.device), text, im.shape[:2], self.trained_centre)
                out.append(label[0].cpu().numpy())
        return out
