"""Augmented views with exact geometric bookkeeping (docs/method.md §2-3).

A view is a square box in the source image's continuous pixel frame (pixel i covers [i, i+1), centre i+0.5),
resampled to `out_size` and optionally flipped left-right. The same :func:`warp` applies it to the image, to the CLIP
map of the un-augmented image (a coarser grid over the same frame) and to region/label maps, so all stay registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.ops import roi_align

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class ViewBatch:
    """One view per image: `boxes` [B,4] as (x0, y0, x1, y1) in source pixels (may extend past the image when
    zooming out; that area becomes 0, or -1 in integer maps), `flips` [B] bool (flip after resampling)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    out_size: int

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"ViewBatch.boxes must be [B,4], got {tuple(self.boxes.shape)}")
        if self.flips.shape != self.boxes.shape[:1]:
            raise ValueError(f"ViewBatch.flips must be [B] = [{self.boxes.shape[0]}], got {tuple(self.flips.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]


def sample_views(batch: int, src_size: tuple[int, int], out_size: int, scale: tuple[float, float],
                 generator: torch.Generator | None = None) -> ViewBatch:
    """Random square crops with a random left-right flip (p = 0.5).

    The crop's area is `s * min(H, W)**2` with s ~ U(scale); s > 1 zooms out. The box is placed uniformly so that it
    lies inside the image along a side where it fits, and covers the whole image along a side where it does not.
    """
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"crop scale must satisfy 0 < low <= high, got {scale}")
    height, width = src_size
    rand = torch.rand(batch, 4, generator=generator)
    side = (lo + (hi - lo) * rand[:, 0]).sqrt() * min(height, width)
    x0 = _place(side, width, rand[:, 1])
    y0 = _place(side, height, rand[:, 2])
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1)
    return ViewBatch(boxes=boxes, flips=rand[:, 3] < 0.5, out_size=out_size)


def _place(side: torch.Tensor, extent: int, u: torch.Tensor) -> torch.Tensor:
    """Start of a box of length `side` on [0, extent]: inside when it fits, else covering it."""
    slack = extent - side
    return torch.minimum(slack, torch.zeros_like(slack)) + u * slack.abs()


def warp(x: torch.Tensor, views: ViewBatch, out_size: int | None = None,
         mode: Literal["bilinear", "nearest"] = "bilinear",
         frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample `x` [B,C,H,W] to each view: [B,C,o,o] with o = `out_size` or `views.out_size`.

    `frame_size` is the (height, width) of the source image the boxes refer to; give it when `x` is a coarser map
    of that image (e.g. CLIP features), and the boxes are rescaled to `x`'s grid. "bilinear" (floats) averages
    over each output cell when shrinking (roi_align); "nearest" takes the source pixel under each output pixel centre
    and works for integer maps (signed dtype; outside the image -> -1) as well as floats (outside -> 0).
    """
    if x.ndim != 4 or x.shape[0] != len(views):
        raise ValueError(f"warp expects [B,C,H,W] with B = {len(views)} views, got {tuple(x.shape)}")
    size = out_size or views.out_size
    height, width = x.shape[-2:]
    frame_h, frame_w = frame_size or (height, width)
    scale = torch.tensor([width / frame_w, height / frame_h] * 2, dtype=torch.float32, device=x.device)
    boxes = views.boxes.to(device=x.device, dtype=torch.float32) * scale
    if mode == "bilinear":
        if not x.is_floating_point():
            raise ValueError(f"bilinear warp needs a floating-point tensor, got {x.dtype}; use mode='nearest'")
        rois = torch.cat([torch.arange(len(views), device=x.device, dtype=torch.float32)[:, None], boxes], dim=1)
        # in float32, whatever x is: float16 or bfloat16 boxes would misplace corners by up to a quarter pixel
        out = roi_align(x.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = out.to(x.dtype)
    elif mode == "nearest":
        out = _warp_nearest(x, boxes, size)
    else:
        raise ValueError(f"unknown warp mode {mode!r}; use 'bilinear' or 'nearest'")
    flips = views.flips.to(x.device)[:, None, None, None]
    return torch.where(flips, out.flip(-1), out)


def cell_footprints(views: ViewBatch, frame_size: tuple[int, int], grid: tuple[int, int],
                    map_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each cell of a coarse map of the source frame (a CLIP patch) lands in every view's ``map_size`` map.

    Returns ROIs [R,5] (view index, x0, y0, x1, y1 in the view map's pixel frame, flips applied) of the cells that
    lie wholly inside their view, and each one's flat cell index [R] (view * gh * gw + row * gw + col), so a map of
    the view pooled over the ROIs compares cell by cell with the coarse map of the un-augmented source.
    """
    height, width = frame_size
    gh, gw = grid
    device = views.boxes.device
    boxes = views.boxes.to(torch.float32)
    x0 = (torch.arange(gw, device=device, dtype=torch.float32) * (width / gw)).repeat(gh)
    y0 = (torch.arange(gh, device=device, dtype=torch.float32) * (height / gh)).repeat_interleave(gw)
    cells = torch.stack([x0, y0, x0 + width / gw, y0 + height / gh], dim=1)  # [G,4] source pixels
    scale = map_size / (boxes[:, 2:3] - boxes[:, 0:1])  # view boxes are square: one scale per view
    xs = (cells[None, :, 0::2] - boxes[:, None, 0:1]) * scale[:, None]  # [B,G,2] in view map pixels
    ys = (cells[None, :, 1::2] - boxes[:, None, 1:2]) * scale[:, None]
    flip = views.flips.to(device)[:, None, None]
    xs = torch.where(flip, map_size - xs.flip(-1), xs)
    inside = ((xs >= 0) & (xs <= map_size) & (ys >= 0) & (ys <= map_size)).all(-1)  # [B,G]
    view, cell = torch.nonzero(inside, as_tuple=True)
    rois = torch.stack([view.float(), xs[view, cell, 0], ys[view, cell, 0], xs[view, cell, 1], ys[view, cell, 1]], 1)
    return rois, view * (gh * gw) + cell


def _warp_nearest(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    if x.dtype in (torch.uint8, torch.bool):
        raise ValueError(f"nearest warp of integer maps needs a signed dtype (outside = -1), got {x.dtype}; "
                         "convert with .long() first")
    batch, channels, height, width = x.shape
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size
    cols = (boxes[:, 0:1] + centres * (boxes[:, 2:3] - boxes[:, 0:1])).floor().long()  # [B,o]
    rows = (boxes[:, 1:2] + centres * (boxes[:, 3:4] - boxes[:, 1:2])).floor().long()
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]  # [B,o,o]
    flat = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
    out = x.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(batch, channels, -1))
    out = out.view(batch, channels, size, size)
    fill = 0 if x.is_floating_point() else -1
    return out.masked_fill(~inside[:, None], fill)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                 p: float = 0.8, grayscale_p: float = 0.2) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (factors ~ U(1-s, 1+s), all applied with probability `p`, in
    that order), then grayscale with probability `grayscale_p`; per image, vectorised. `images` are RGB in [0,1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"color_jitter expects RGB images [B,3,H,W], got {tuple(images.shape)}")
    batch = images.shape[0]
    rand = torch.rand(batch, 5, generator=generator).to(images.device, images.dtype)
    apply = (rand[:, 0] < p).to(images.dtype)
    bright, contrast, sat = (1 + strength * (2 * rand[:, 1:4] - 1) * apply[:, None]).unbind(1)
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)

    out = (images * bright.view(-1, 1, 1, 1)).clamp(0, 1)
    mean = (out * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    out = (mean + (out - mean) * contrast.view(-1, 1, 1, 1)).clamp(0, 1)
    gray = (out * weights).sum(1, keepdim=True)
    out = (gray + (out - gray) * sat.view(-1, 1, 1, 1)).clamp(0, 1)
    to_gray = (rand[:, 4] < grayscale_p).view(-1, 1, 1, 1)
    return torch.where(to_gray, (out * weights).sum(1, keepdim=True).expand_as(out), out)
