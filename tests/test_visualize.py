"""Every picture is written as a valid PNG; PCA colours separate distinct embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clips4.visualize import embedding_comparison, overlay_grid, pca_rgb, plot_curves, prototype_map, share_bars

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
NAMES = ["grass", "kite", "ring"]


def assert_png(path):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 50 and image.size[1] > 50


def test_overlay_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 20, 3), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 3, (16, 20)).astype(np.uint8) for _ in range(2)]
    labels[0][:4] = 255
    predictions = {"MaskCLIP": [np.zeros((16, 20), int)] * 2, "CLIP-S4": [torch.ones(16, 20, dtype=torch.long)] * 2}
    assert_png(overlay_grid(images, labels, predictions, NAMES, palette=PALETTE, path=tmp_path / "sub" / "overlay.png"))
    with pytest.raises(ValueError, match="every image"):
        overlay_grid(images, labels[:1], predictions, NAMES, palette=PALETTE, path=tmp_path / "bad.png")
    with pytest.raises(ValueError, match="palette"):
        overlay_grid(images, [np.full((16, 20), 7)] * 2, {}, NAMES, palette=PALETTE, path=tmp_path / "bad.png")


def test_pca_rgb_separates_two_regions():
    emb = torch.zeros(8, 6, 10)
    emb[0, :, :5] = 1.0
    emb[1, :, 5:] = 1.0
    emb += 0.01 * torch.randn(8, 6, 10, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(emb)
    assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8
    left, right = rgb[:, :5].reshape(-1, 3).astype(int), rgb[:, 5:].reshape(-1, 3).astype(int)
    assert np.abs(left.mean(0) - right.mean(0)).max() > 150
    assert pca_rgb(torch.randn(2, 4, 4)).shape == (4, 4, 3)  # fewer dims than colours
    with pytest.raises(ValueError, match="D,h,w"):
        pca_rgb(torch.randn(4, 4))


def test_embedding_comparison(tmp_path):
    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    student = [torch.randn(16, 16, 16) for _ in range(2)]
    teacher = [np.random.default_rng(1).normal(size=(16, 4, 4)) for _ in range(2)]
    assert_png(embedding_comparison(images, student, teacher, tmp_path / "embeddings.png"))


def test_plot_curves(tmp_path):
    steps = np.arange(20)
    df = pd.DataFrame(
        {
            "step": np.tile(steps, 3),
            "component": np.repeat(["total", "contrast", "sem"], 20),
            "value": np.exp(-np.tile(steps, 3) / 10),
        }
    )
    assert_png(plot_curves(df, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="component"):
        plot_curves(df.drop(columns="component"), tmp_path / "bad.png")


def test_prototype_map(tmp_path):
    known, unknown = torch.randn(3, 8), torch.randn(5, 8)
    assert_png(prototype_map(known, unknown, NAMES, tmp_path / "prototypes.png"))
    assert_png(prototype_map(known, torch.empty(0, 8), NAMES, tmp_path / "no_unknown.png"))
    with pytest.raises(ValueError, match="names"):
        prototype_map(known, unknown, NAMES[:2], tmp_path / "bad.png")


def test_share_bars(tmp_path):
    table = pd.DataFrame({"class": ["grass", "box"], "held_out": [False, True], "maskclip_share": [0.9, 0.1],
                          "clips4_share": [1.0, 0.0], "bias": [0.0, 3.0], "clips4_share_with_bias": [0.97, 0.03]})
    assert share_bars(table, tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(ValueError, match="share"):
        share_bars(table[["class", "bias"]], tmp_path / "t.png")
