"""Uniform samples of dense vectors, bounded in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clips4.sampling import sample_features, sample_pixels


def test_sample_features_draws_unit_rows_from_the_stored_images() -> None:
    stored = np.random.default_rng(0).normal(size=(5, 3, 2, 4)).astype(np.float32)  # [N,h,w,D]
    sample = sample_features(stored, 12, seed=1)
    assert sample.shape == (12, 4) and sample.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sample, axis=1), 1, rtol=1e-5)
    units = stored.reshape(-1, 4) / np.linalg.norm(stored.reshape(-1, 4), axis=1, keepdims=True)
    assert all(np.isclose(units, row, atol=1e-6).all(axis=1).any() for row in sample)
    np.testing.assert_array_equal(sample, sample_features(stored, 12, seed=1))
    assert sample_features(stored, 10_000, seed=1).shape == (30, 4)  # never more than there is


def test_sample_pixels_keeps_the_highest_priorities_of_all_pixels() -> None:
    """Cutting back only when twice the sample is held keeps what cutting after every batch would: the pixels of
    the ``size`` highest priorities, drawn in the same order."""
    maps = torch.randn(40, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    batches = list(maps.split(1))
    generator = torch.Generator().manual_seed(2)
    priority = torch.cat([torch.rand(20, generator=generator) for _ in batches])
    pixels = maps.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = pixels[priority.topk(25).indices]
    torch.testing.assert_close(sample_pixels(batches, 25, seed=2), expected)
    assert sample_pixels([maps], 5000, seed=2).shape == (800, 3)  # all of them when the sample is larger
    with pytest.raises(ValueError, match="empty"):
        sample_pixels([], 10, seed=0)
