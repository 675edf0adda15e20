"""Square resizing shared by every stage that feeds images to a network, so features, regions and training views
all see the same pixels. Predictions are mapped back to each image's own size at evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clips4.data.io import read_image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3] (bicubic; aspect ratio is not kept, evaluation resizes back)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def read_square_batch(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """The images at ``paths`` decoded and resized, one uint8 batch [B,size,size,3]: a function of paths alone, so
    a worker process that imports nothing else can run it."""
    return np.stack([resize_square(read_image(path), size) for path in paths])


def resize_labels(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to (height, width)."""
    if label.shape[:2] == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def to_unit_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0,1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)


def normalize_images(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> a model's input normalisation: the teacher's mean and std, which the student shares."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s
