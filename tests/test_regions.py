"""Superpixel regions: contiguous ids, deterministic, sensible counts, and they follow colour edges."""

from __future__ import annotations

import numpy as np
import pytest

from clips4.config import RegionsConfig
from PIL import Image

from clips4.data.regions import compute_regions, prepare_all

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=np.float64)


def shapes_image(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat colours with mild noise: a slanted split and two discs (edges off any regular grid), and the part map."""
    y, x = np.mgrid[:size, :size] * (64 / size) + 0.5
    part = (x + 0.6 * y > 45).astype(np.int64)
    part[(x - 38) ** 2 + (y - 26) ** 2 < 15**2] = 2
    part[(x - 16) ** 2 + (y - 46) ** 2 < 10**2] = 3
    noise = np.random.default_rng(seed).normal(0, 6, (size, size, 3))
    return np.clip(COLOURS[part] + noise, 0, 255).astype(np.uint8), part


def purity(regions: np.ndarray, part: np.ndarray) -> float:
    """Fraction of pixels whose region's majority part is their own part (1 = no region crosses an edge)."""
    table = np.zeros((regions.max() + 1, part.max() + 1), dtype=np.int64)
    np.add.at(table, (regions.ravel(), part.ravel()), 1)
    return float(table.max(axis=1).sum() / table.sum())


CONFIGS = {
    "slic": (RegionsConfig(method="slic", n_segments=64), (16, 128)),
    "felzenszwalb": (RegionsConfig(method="felzenszwalb", scale=100, min_size=20), (4, 200)),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_regions_are_contiguous_deterministic_and_follow_edges(method: str) -> None:
    cfg, (low, high) = CONFIGS[method]
    image, part = shapes_image()
    regions = compute_regions(image, cfg)
    assert regions.dtype == np.int32 and regions.shape == (64, 64)
    count = int(regions.max()) + 1
    assert np.array_equal(np.unique(regions), np.arange(count))
    assert low <= count <= high
    assert np.array_equal(regions, compute_regions(image.copy(), cfg))
    # regions follow the colour edges: better than a regular 8x8 grid of blocks, and nearly pure
    y, x = np.mgrid[:64, :64]
    assert purity(regions, part) >= max(0.95, purity((y // 8) * 8 + x // 8, part))


def test_slic_count_follows_n_segments() -> None:
    image, _ = shapes_image(96, seed=1)
    few = compute_regions(image, RegionsConfig(method="slic", n_segments=16)).max() + 1
    many = compute_regions(image, RegionsConfig(method="slic", n_segments=144)).max() + 1
    assert few < many


def test_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        compute_regions(np.zeros((8, 8), np.uint8), RegionsConfig())
    with pytest.raises(ValueError, match="float64"):
        compute_regions(np.zeros((8, 8, 3)), RegionsConfig())


def test_worker_processes_give_the_same_images_and_regions_in_order(tmp_path) -> None:
    paths = []
    for seed in range(7):
        path = tmp_path / f"{seed}.png"
        Image.fromarray(shapes_image(48 + 8 * seed, seed)[0]).save(path)
        paths.append(path)
    cfg = RegionsConfig()
    serial = list(prepare_all(paths, 40, cfg))
    parallel = list(prepare_all(paths, 40, cfg, workers=2))
    assert len(serial) == len(parallel) == 7
    for (image_a, regions_a), (image_b, regions_b) in zip(serial, parallel):
        assert image_a.shape == (40, 40, 3) and regions_a.shape == (40, 40)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(regions_a, regions_b)
