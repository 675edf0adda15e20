"""Uniform samples of dense vectors whose memory is bounded by the sample, not by the dataset.

Two sources, one rule (every position equally likely): a stored [N,h,w,D] array read one image at a time (the
cluster stage's k-means input) and a stream of maps [B,D,h,w] seen once (k-means of the unsupervised protocol, the
share floor's student pixels).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

# Statistics measured on a split without its labels (the student's embedding centre, the share floor) use at most
# this many images, evenly strided, so a large dataset costs a bounded pass (the demo's 800 training images are all
# used).
STATISTICS_IMAGES = 1024


def strided(n: int, max_images: int = STATISTICS_IMAGES) -> range:
    """At most ``max_images`` of ``n`` image indices, evenly strided: a bounded pass over a large dataset."""
    return range(0, n, -(-n // max_images))


def sample_features(features, size: int, seed: int) -> np.ndarray:
    """``size`` dense vectors float32 [size,D] drawn uniformly over the images and positions of a [N,h,w,D] array
    (a Zarr array or anything indexable by image), re-normalised. Reads only the images drawn, one at a time."""
    n, h, w, d = features.shape
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.integers(0, n * h * w, size=min(size, n * h * w)))
    image, pos = np.divmod(picks, h * w)
    out = np.empty((len(picks), d), np.float32)
    for i in np.unique(image):
        rows = image == i
        out[rows] = np.asarray(features[int(i)]).reshape(h * w, d)[pos[rows]]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def sample_pixels(batches: Iterable[torch.Tensor], size: int, seed: int) -> torch.Tensor:
    """A uniform random sample of at most ``size`` pixel embeddings [N,D] (float32, CPU) from maps [B,D,h,w].

    Every pixel draws a random priority and the ``size`` highest are kept (highest first), so memory stays bounded by
    twice the sample plus one batch however many batches come. Batches are gathered until they hold twice the
    sample and only then cut back: cutting after every small batch would copy the whole sample each time.
    """
    generator = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    priority: list[torch.Tensor] = []
    count = 0

    def cut() -> None:
        nonlocal kept, priority, count
        values, top = torch.cat(priority).topk(size)
        kept, priority, count = [torch.cat(kept)[top]], [values], size

    for emb in batches:
        pixels = emb.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        kept.append(pixels)
        priority.append(torch.rand(len(pixels), generator=generator))
        count += len(pixels)
        if count > 2 * size:
            cut()
    if count == 0:
        raise ValueError("no embeddings to sample from: the batches are empty")
    if count > size:
        cut()
    return torch.cat(kept)
