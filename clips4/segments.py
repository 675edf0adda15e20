"""Per-view segments for the contrastive loss (docs/method.md §2, after HSG).

Spherical k-means on [embedding ; position] groups pixels into spatially coherent clusters; intersecting the
clusters with the source image's regions (superpixels) guarantees no segment crosses a region boundary, so a
segment's region tells which segments of the other view are its positives. No gradient flows through any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Segments:
    """Segments of a batch of views. `ids` [B,h,w]: contiguous segment ids over the whole batch, -1 where ignored;
    `image` [num]: the view each segment lies in; `region` [num]: the region id the segment lies in."""

    ids: torch.Tensor
    num: int
    image: torch.Tensor
    region: torch.Tensor


def pixel_positions(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(y, x) of every pixel, row-major, scaled to [-0.5, 0.5]: [h*w, 2]."""
    ys = torch.linspace(-0.5, 0.5, height, device=device)
    xs = torch.linspace(-0.5, 0.5, width, device=device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(-1, 2)


def grid_cells(height: int, width: int, grid: int, device: torch.device) -> torch.Tensor:
    """Index of the grid x grid cell that holds each pixel, row-major: [h*w]."""
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    return (rows[:, None] * grid + cols[None, :]).view(-1)


@torch.no_grad()
def spherical_kmeans(points: torch.Tensor, valid: torch.Tensor, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Batched spherical k-means. `points` [B,P,E] unit rows, `valid` [B,P] bool (only valid points move centres),
    `init` [B,P] long: the starting partition into k = init.max()+1 clusters. A cluster left empty keeps its centre;
    one that never had a valid member takes no points. Returns the assignment [B,P]."""
    batch, _, dim = points.shape
    k = int(init.max()) + 1
    weights = valid.to(points.dtype).reshape(-1)
    weighted = points.reshape(-1, dim) * weights[:, None]
    first = torch.arange(batch, device=points.device)[:, None] * k  # cluster c of view b is row b*k + c
    assign = init
    centres = points.new_zeros(batch, k, dim)
    alive = torch.zeros(batch, k, dtype=torch.bool, device=points.device)  # has ever had a member
    for _ in range(iters):
        rows = (assign + first).reshape(-1)
        sums = points.new_zeros(batch * k, dim).index_add_(0, rows, weighted).view(batch, k, dim)
        filled = points.new_zeros(batch * k).index_add_(0, rows, weights).view(batch, k) > 0
        centres = torch.where(filled[..., None], F.normalize(sums, dim=-1), centres)
        alive |= filled
        sims = torch.bmm(points, centres.transpose(1, 2).contiguous())
        sims = sims.masked_fill(~alive[:, None, :], float("-inf"))
        assign = sims.argmax(-1)
    return assign


@torch.no_grad()
def segment_views(emb: torch.Tensor, regions: torch.Tensor, grid: int = 4, iters: int = 10) -> Segments:
    """Segments of each view: k-means clusters (seeded by a grid x grid partition) intersected with `regions`.

    `emb` [B,D,h,w] unit pixel embeddings; `regions` [B,h,w] integer region ids, -1 for pixels to ignore (outside
    the image). Region ids are returned as given, so callers that need them unique across images make them so.
    """
    if emb.ndim != 4 or regions.shape != (emb.shape[0], *emb.shape[2:]):
        raise ValueError(f"segment_views expects emb [B,D,h,w] and regions [B,h,w], got {tuple(emb.shape)} "
                         f"and {tuple(regions.shape)}")
    if regions.is_floating_point():
        raise ValueError(f"regions must be an integer map, got {regions.dtype}")
    if grid < 1 or iters < 1:
        raise ValueError(f"grid and iters must be at least 1, got grid={grid}, iters={iters}")
    batch, _, height, width = emb.shape
    device = emb.device
    pixels = emb.detach().float().flatten(2).transpose(1, 2)  # [B,P,D]
    pos = pixel_positions(height, width, device).expand(batch, -1, -1)
    points = F.normalize(torch.cat([pixels, pos], dim=-1), dim=-1)
    region = regions.reshape(batch, -1).long()
    valid = region >= 0
    init = grid_cells(height, width, grid, device).expand(batch, -1)
    cluster = spherical_kmeans(points, valid, init, iters)

    # a segment is a unique (view, cluster, region) triple; encode it as one integer key
    k = grid * grid
    span = int(region.max().clamp(min=0)) + 1
    view = torch.arange(batch, device=device)[:, None]
    key = (view * k + cluster) * span + region
    uniq, inverse = torch.unique(key[valid], return_inverse=True)
    ids = torch.full_like(region, -1)
    ids[valid] = inverse
    return Segments(
        ids=ids.view(batch, height, width),
        num=uniq.numel(),
        image=uniq // (k * span),
        region=uniq % span,
    )
