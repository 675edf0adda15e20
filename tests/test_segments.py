import pytest
import torch
import torch.nn.functional as F

from clips4.segments import segment_views, spherical_kmeans


def block_regions(batch: int, size: int, block: int) -> torch.Tensor:
    """[B,size,size] square regions of side `block`, ids unique within each image."""
    cells = torch.arange(size) // block
    per_side = -(-size // block)
    return (cells[:, None] * per_side + cells[None, :]).expand(batch, -1, -1).clone()


def test_segments_never_cross_regions_and_ids_are_contiguous(device):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(3, 8, 12, 12), dim=1).to(device)
    regions = torch.randint(0, 5, (3, 12, 12)) + 10 * torch.arange(3)[:, None, None]
    regions[0, :2] = -1
    regions = regions.to(device)
    segs = segment_views(emb, regions, grid=3, iters=5)
    valid = regions >= 0
    assert ((segs.ids >= 0) == valid).all()
    assert torch.equal(segs.ids[valid].unique(), torch.arange(segs.num, device=device))
    assert torch.equal(segs.region[segs.ids[valid]], regions[valid])
    image = torch.arange(3, device=device)[:, None, None].expand_as(regions)
    assert torch.equal(segs.image[segs.ids[valid]], image[valid])
    assert segs.num > regions[valid].unique().numel()  # the clusters split regions further


def test_clusters_follow_the_embedding():
    """Two halves with orthogonal embeddings: every segment stays inside one half, even with one big region."""
    emb = torch.zeros(2, 4, 16, 16)
    emb[:, 0, :, :7] = 1
    emb[:, 1, :, 7:] = 1
    segs = segment_views(emb, torch.zeros(2, 16, 16, dtype=torch.long), grid=4, iters=10)
    left = torch.zeros(2, 16, 16, dtype=torch.long)
    left[:, :, :7] = 1
    per_segment = torch.zeros(segs.num, 2, dtype=torch.long).index_put_(
        (segs.ids.flatten(), left.flatten()), torch.tensor(1), accumulate=True)
    assert ((per_segment > 0).sum(1) == 1).all()


def test_batched_segments_equal_per_image_segments():
    torch.manual_seed(1)
    emb = F.normalize(torch.randn(2, 6, 10, 10), dim=1)
    regions = block_regions(2, 10, 4)
    both = segment_views(emb, regions, grid=2, iters=4)
    first = segment_views(emb[:1], regions[:1], grid=2, iters=4)
    second = segment_views(emb[1:], regions[1:], grid=2, iters=4)
    assert both.num == first.num + second.num
    assert torch.equal(both.ids[0], first.ids[0])
    assert torch.equal(both.ids[1], second.ids[0] + first.num)
    assert torch.equal(both.region, torch.cat([first.region, second.region]))


def test_kmeans_ignores_invalid_points_and_unfilled_seeds():
    points = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]]]), dim=-1)
    valid = torch.tensor([[True, True, True, True, False]])
    init = torch.tensor([[0, 0, 1, 1, 2]])  # cluster 2 only ever holds an invalid point
    assign = spherical_kmeans(points, valid, init, iters=3)
    assert assign[0].tolist()[:4] == [0, 0, 1, 1]
    assert (assign != 2).all()


def test_segment_views_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"regions \[B,h,w\]"):
        segment_views(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        segment_views(torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 8))
