import math

import pytest
import torch
import torch.nn.functional as F

from torchvision.ops import roi_align

from clips4.views import ViewBatch, cell_footprints, color_jitter, sample_views, warp


def coordinate_image(size: int) -> torch.Tensor:
    """[1,3,size,size]: x and y of each pixel centre (linear) and a smooth function of both."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    smooth = torch.sin(x / 9.0) * torch.cos(y / 11.0)
    return torch.stack([x, y, smooth])[None]


def views(boxes, flips, out_size: int) -> ViewBatch:
    return ViewBatch(torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips), out_size)


def test_warping_a_map_matches_warping_its_image(device):
    """Registration: crop+flip the image then downsample == downsample to a map then crop+flip the map."""
    image = coordinate_image(64).repeat(4, 1, 1, 1).to(device)
    coarse = F.avg_pool2d(image, 4)  # a 16x16 "CLIP map" of the 64px image
    vb = views([[4, 6, 40, 42], [10.5, 8.25, 58, 55.75], [5, 5, 59, 59], [20, 4, 44, 28]],
               [True, False, True, False], out_size=32)
    from_image = F.avg_pool2d(warp(image, vb), 2)
    from_map = warp(coarse, vb, out_size=16, frame_size=(64, 64))
    assert from_map.shape == (4, 3, 16, 16)
    torch.testing.assert_close(from_map[:, :2], from_image[:, :2], atol=1e-3, rtol=0)
    assert (from_map[:, 2] - from_image[:, 2]).abs().max() < 0.06  # interpolation error; a 1-cell shift gives ~0.4
    # the maps really moved: the flipped views run right to left
    assert from_map[0, 0, 0, 0] > from_map[0, 0, 0, -1] and from_map[1, 0, 0, 0] < from_map[1, 0, 0, -1]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_full_box_is_identity_and_flip_mirrors_left_right(mode):
    image = coordinate_image(16).repeat(2, 1, 1, 1)
    vb = views([[0, 0, 16, 16]] * 2, [False, True], out_size=16)
    out = warp(image, vb, mode=mode)
    torch.testing.assert_close(out[0], image[0])
    torch.testing.assert_close(out[1], image[1].flip(-1))


def test_zoom_out_pads_images_with_zero_and_maps_with_minus_one():
    image = torch.rand(1, 3, 16, 16) + 0.5
    regions = torch.arange(256).view(1, 1, 16, 16)
    vb = views([[-8, -8, 24, 24]], [False], out_size=32)  # scale 4: the image fills the middle half
    out = warp(image, vb)
    torch.testing.assert_close(out[..., 8:24, 8:24], image)
    assert out[..., :7, :].abs().max() == 0 and out[..., 25:, :].abs().max() == 0 and out[..., :, :7].abs().max() == 0
    out_regions = warp(regions, vb, mode="nearest")
    assert out_regions.dtype == torch.long
    torch.testing.assert_close(out_regions[..., 8:24, 8:24], regions)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:24, 8:24] = True
    assert (out_regions[0, 0][~inside] == -1).all()


def test_nearest_warp_of_a_coarse_map_picks_the_pixel_under_each_centre():
    labels = torch.randint(0, 50, (2, 1, 8, 8))
    boxes = [[3.0, 10.0, 35.0, 26.0], [-4.0, 0.0, 28.0, 32.0]]
    vb = views(boxes, [False, True], out_size=6)
    out = warp(labels, vb, mode="nearest", frame_size=(32, 32))
    for b, (x0, y0, x1, y1) in enumerate(boxes):
        expected = torch.full((6, 6), -1, dtype=torch.long)
        for i in range(6):
            for j in range(6):
                row = math.floor((y0 + (i + 0.5) * (y1 - y0) / 6) / 4)
                col = math.floor((x0 + (j + 0.5) * (x1 - x0) / 6) / 4)
                if 0 <= row < 8 and 0 <= col < 8:
                    expected[i, j] = labels[b, 0, row, col]
        if b == 1:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[b, 0], expected)


def test_warp_refuses_unsigned_maps_and_bilinear_integers():
    vb = views([[0, 0, 4, 4]], [False], out_size=4)
    with pytest.raises(ValueError, match="signed dtype"):
        warp(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), vb, mode="nearest")
    with pytest.raises(ValueError, match="nearest"):
        warp(torch.zeros(1, 1, 4, 4, dtype=torch.long), vb)
    with pytest.raises(ValueError, match="B = 1"):
        warp(torch.zeros(2, 1, 4, 4), vb)


def test_sample_views_draws_square_crops_that_fit_or_cover_the_image():
    gen = torch.Generator().manual_seed(0)
    vb = sample_views(400, (48, 64), out_size=32, scale=(0.5, 1.5), generator=gen)
    x0, y0, x1, y1 = vb.boxes.unbind(1)
    side = x1 - x0
    torch.testing.assert_close(side, y1 - y0)
    assert side.min() >= math.sqrt(0.5) * 48 - 1e-4 and side.max() <= math.sqrt(1.5) * 48 + 1e-4
    eps = 1e-4
    for lo, hi, extent in ((x0, x1, 64), (y0, y1, 48)):
        fits = hi - lo <= extent
        assert ((lo[fits] >= -eps) & (hi[fits] <= extent + eps)).all()
        assert ((lo[~fits] <= eps) & (hi[~fits] >= extent - eps)).all()
    assert (side > 48).any() and (side < 48).any()
    assert 0.4 < vb.flips.float().mean() < 0.6
    again = sample_views(400, (48, 64), 32, (0.5, 1.5), torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.boxes, vb.boxes)


def test_color_jitter_is_seeded_bounded_and_grays():
    images = torch.rand(8, 3, 8, 8)
    out = color_jitter(images, 0.4, torch.Generator().manual_seed(0), p=1.0, grayscale_p=0.0)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
    change = (out - images).abs().mean(dim=(1, 2, 3))
    assert change.std() > 0  # factors differ per image
    torch.testing.assert_close(out, color_jitter(images, 0.4, torch.Generator().manual_seed(0), p=1.0, grayscale_p=0.0))
    torch.testing.assert_close(color_jitter(images, 0.0, grayscale_p=0.0), images)
    gray = color_jitter(images, 0.0, grayscale_p=1.0)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])
    torch.testing.assert_close(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])


def test_cell_footprints_register_a_coarse_map_of_the_source_with_each_view():
    """Pooling a view over the footprints == the coarse (patch-mean) map of the source, cell by cell; cells that
    leave the view are dropped and flips mirror the footprints."""
    image = coordinate_image(64).repeat(3, 1, 1, 1)
    coarse = F.avg_pool2d(image, 8)  # the 8x8 "CLIP map": one cell per 8x8 patch
    vb = views([[0, 0, 64, 64], [10, 6, 50, 46], [-8, -8, 72, 72]], [True, False, True], out_size=32)
    rois, cell = cell_footprints(vb, (64, 64), (8, 8), 32)
    assert (rois[:, 0].long() == cell // 64).all()
    per_view = torch.bincount(cell // 64, minlength=3)
    assert per_view.tolist() == [64, 16, 64]  # the 40px crop holds the 4x4 patches wholly inside it
    pooled = roi_align(warp(image, vb), rois, output_size=1, spatial_scale=1.0, sampling_ratio=8, aligned=True)
    expected = coarse.flatten(2).transpose(1, 2).reshape(-1, 3)[cell]
    error = (pooled.flatten(1)[:, :2] - expected[:, :2]).abs()  # x and y of the pixel centres, 0.5 ... 63.5
    assert error[cell < 128].max() < 0.1
    assert error[cell >= 128].max() < 2  # zoomed out: edge cells blend with the zero padding; a shift would be 8
    first = rois[cell == 0][0]  # top-left patch of the flipped full view sits at the top right of the map
    torch.testing.assert_close(first[1:], torch.tensor([28.0, 0.0, 32.0, 4.0]))
