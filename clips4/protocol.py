"""How a model meets a test image: the evaluation protocols of published tables, for any dense scorer
(docs/method.md §6).

Tables of training-free CLIP segmentation (the SCLIP family) resize each image keeping its aspect ratio so that its
short side has a fixed length, score square windows that overlap, average the class scores where they do, and resize
the scores to the label's original size before the argmax; MaskCLIP's own tables score the whole resized image.
Benchmarks whose labels have a background class predict it where no named class is confident
(:func:`threshold_background`). Images are uint8 RGB [H,W,3] arrays, as every dataset reader gives them; scores are
torch tensors [B,K,h,w].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clips4.config import EvaluateConfig
from clips4.evaluation import upsample_argmax

Scorer = Callable[[np.ndarray], torch.Tensor]
"""uint8 RGB windows [B,h,w,3] of one size -> class scores [B,K,h',w'] at the model's own resolution."""
Box = tuple[int, int, int, int]
"""(top, left, bottom, right) of a window, in pixels."""


def keep_ratio_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) scaled so that the short side is ``short_side`` (each side rounded half up, at least 1)."""
    if min(height, width) < 1 or short_side < 1:
        raise ValueError(f"sizes must be positive, got a {height}x{width} image and short side {short_side}")
    scale = short_side / min(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H,W,3] resized to (height, width), bilinear without antialiasing, as the field's harness resizes."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.tensor(image).permute(2, 0, 1)[None].float()  # a copy: decoded images may be read-only
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scores [B,K,h,w] resized (bilinear) to ``size``, as float32."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores.float()
    return F.interpolate(scores.float(), size=tuple(size), mode="bilinear", align_corners=False)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[Box]:
    """Every window of the sliding protocol: a ``crop`` x ``crop`` square every ``stride`` pixels, cut to the
    image where the image is smaller; the last window of each row and column is moved back to end at the image's
    border, so the windows cover every pixel and all have one size."""
    if not 1 <= stride <= crop:
        raise ValueError(f"the window stride must lie in [1, crop={crop}], got {stride}; a larger one skips pixels")

    def starts(n: int) -> list[int]:
        if n <= crop:
            return [0]
        return [min(i * stride, n - crop) for i in range(-(-(n - crop) // stride) + 1)]

    return [(t, l, min(t + crop, height), min(l + crop, width)) for t in starts(height) for l in starts(width)]


def _nearest_multiple(n: int, multiple: int) -> int:
    return max(multiple, round(n / multiple) * multiple)


def window_scores(score: Scorer, windows: np.ndarray, num_classes: int, multiple: int = 1) -> torch.Tensor:
    """Scores float32 [B,K,h,w] of uint8 ``windows`` [B,h,w,3], at the windows' own size. A model whose inputs must
    be a multiple of ``multiple`` (a ViT's patch) sees each window resized to the nearest multiple; its scores are
    resized back."""
    h, w = windows.shape[1:3]
    fitted = (_nearest_multiple(h, multiple), _nearest_multiple(w, multiple))
    if fitted != (h, w):
        windows = np.stack([resize_image(x, fitted) for x in windows])
    scores = score(windows)
    if scores.ndim != 4 or scores.shape[:2] != (len(windows), num_classes):
        raise ValueError(f"the scorer gave scores of shape {tuple(scores.shape)} for {len(windows)} windows; "
                         f"expected [{len(windows)},{num_classes},h,w]")
    return resize_scores(scores, (h, w))


@torch.no_grad()
def slide_logits(score: Scorer, image: np.ndarray, crop: int, stride: int, num_classes: int, *, multiple: int = 1,
                 batch_size: int = 16) -> torch.Tensor:
    """Class scores float32 [1,K,H,W] of uint8 ``image`` [H,W,3] by sliding windows (:func:`window_boxes`): each
    window's scores, resized to the window, are summed into place and divided by how many windows saw each pixel.
    An image smaller than ``crop`` is one window of its own size. Windows are scored ``batch_size`` at a time."""
    height, width = image.shape[:2]
    boxes = window_boxes(height, width, crop, stride)
    total = count = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        scores = window_scores(score, np.stack([image[t:b, l:r] for t, l, b, r in chunk]), num_classes, multiple)
        if total is None:
            total = scores.new_zeros(1, num_classes, height, width)
            count = scores.new_zeros(1, 1, height, width)
        for (t, l, b, r), s in zip(chunk, scores):
            total[0, :, t:b, l:r] += s
            count[0, :, t:b, l:r] += 1
    return total / count


@torch.no_grad()
def whole_logits(score: Scorer, image: np.ndarray, num_classes: int, *, multiple: int = 1) -> torch.Tensor:
    """Class scores float32 [1,K,H,W] of uint8 ``image`` [H,W,3] seen whole, resized to the image."""
    return window_scores(score, image[None], num_classes, multiple)


def protocol_scores(score: Scorer, image: np.ndarray, out_size: tuple[int, int], cfg: EvaluateConfig,
                    num_classes: int, scales: Sequence[float] = (1.0,), *, multiple: int = 1,
                    batch_size: int = 16) -> torch.Tensor:
    """Class scores float32 [1,K,*out_size] of uint8 ``image`` [H,W,3] under ``cfg.protocol`` ('whole' or 'slide'),
    averaged over ``scales``: at scale s the image is resized keeping its aspect ratio to a short side of s x
    ``cfg.short_side`` (s x its own short side when that is None), scored whole or by windows of ``cfg.crop`` every
    ``cfg.stride`` pixels, and the scores resized (bilinear) to ``out_size``, the label's original size."""
    if cfg.protocol not in ("whole", "slide"):
        raise ValueError(f"protocol {cfg.protocol!r} reads stored maps; protocol_scores runs 'whole' or 'slide'")
    height, width = image.shape[:2]
    total = None
    for s in scales:
        short = max(1, round(s * (cfg.short_side or min(height, width))))
        resized = resize_image(image, keep_ratio_size(height, width, short))
        if cfg.protocol == "slide":
            logits = slide_logits(score, resized, cfg.crop, cfg.stride, num_classes, multiple=multiple,
                                  batch_size=batch_size)
        else:
            logits = whole_logits(score, resized, num_classes, multiple=multiple)
        logits = resize_scores(logits, out_size)
        total = logits if total is None else total + logits
    return total / len(scales)


def threshold_background(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Labels int64 [B,H,W] from CLIP-scaled scores [B,K-1,H,W] (100 x cosine) of classes 1..K-1: the best class,
    or 0 (background, which has no text) where its softmax probability over those classes is below ``threshold``."""
    best, index = scores.float().softmax(dim=1).max(dim=1)
    return torch.where(best < threshold, torch.zeros_like(index), index + 1)


def predict_labels(scores: torch.Tensor, size: tuple[int, int],
                   background_threshold: float | None = None) -> torch.Tensor:
    """Labels int64 [B,*size] of class scores [B,K',h,w], resized (bilinear) to ``size`` first: their argmax, or with
    ``background_threshold`` the classes 1..K' behind a background 0 (:func:`threshold_background`)."""
    if background_threshold is None:
        return upsample_argmax(scores, size)
    return torch.cat([threshold_background(resize_scores(s[None], size), background_threshold) for s in scores])
