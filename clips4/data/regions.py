"""Superpixel regions (docs/method.md §2): the over-segmentation whose segments are each other's contrastive positives."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from skimage.segmentation import felzenszwalb, slic

from clips4.config import RegionsConfig
from clips4.data.io import read_image
from clips4.data.prepare import resize_square
from clips4.overlap import WorkAhead

AHEAD = 4  # images in flight per worker process: keeps every worker busy while bounding memory


def compute_regions(image: np.ndarray, cfg: RegionsConfig) -> np.ndarray:
    """Region id per pixel, int32 [H, W], ids contiguous 0..R-1.

    Both scikit-image algorithms are deterministic, so the same image and config always give the same map.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"compute_regions needs a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
    if cfg.method == "slic":
        labels = slic(
            image,
            n_segments=cfg.n_segments,
            compactness=cfg.compactness,
            sigma=cfg.sigma,
            start_label=0,
            channel_axis=-1,
        )
    else:
        labels = felzenszwalb(image, scale=cfg.scale, sigma=cfg.sigma, min_size=cfg.min_size, channel_axis=-1)
    _, ids = np.unique(labels, return_inverse=True)  # contiguous even where an algorithm leaves gaps
    return ids.reshape(labels.shape).astype(np.int32)


def prepared(path: str | Path, size: int, cfg: RegionsConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training image resized to ``size``-square and its region map."""
    image = resize_square(read_image(path), size)
    return image, compute_regions(image, cfg)


def prepare_all(
    paths: Sequence[str | Path], size: int, cfg: RegionsConfig, workers: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`prepared` for every path, in order. With ``workers`` > 0 the images are done in that many processes
    (superpixels hold the GIL), at most ``AHEAD`` per worker in flight, so memory does not grow with the split."""
    with WorkAhead(prepared, [(p, size, cfg) for p in paths], workers, AHEAD * workers, processes=True) as work:
        yield from work.take(0, len(paths))
