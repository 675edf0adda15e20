"""Superpixel regions (METHOD.md §2): the over-segmentation whose segments are each other's contrastive positives."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb, slic

from clips4.config import RegionsConfig


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
