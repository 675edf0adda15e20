"""Confusion-matrix metrics against torchmetrics, known/unknown splits, and Hungarian matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from clips4.metrics import ConfusionMatrix, hungarian_mapping, segmentation_scores

K = 6


def random_maps(seed: int, shape=(3, 17, 23)):
    """Predictions and targets over K classes with ignored pixels; class 4 only ever appears on ignored pixels and
    class 5 nowhere, so both are absent from the scored pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, 4, shape, generator=g))
    ignored = torch.rand(shape, generator=g) < 0.2
    pred[ignored] = 4
    target[ignored] = 255
    return pred, target


def test_scores_match_torchmetrics_with_ignore_index_and_empty_classes():
    pred, target = random_maps(0)
    confusion = ConfusionMatrix(K)
    confusion.update(pred, target)
    scores = segmentation_scores(confusion.matrix)
    reference = MulticlassJaccardIndex(K, ignore_index=255, average=None)(pred, target).numpy()
    present = np.arange(4)
    np.testing.assert_allclose(scores["per_class_iou"][present], reference[present], atol=1e-6)
    assert np.isnan(scores["per_class_iou"][4:]).all()
    macro = MulticlassJaccardIndex(K, ignore_index=255, average="macro")(pred, target)
    assert scores["mIoU"] == pytest.approx(float(macro), abs=1e-6)
    accuracy = MulticlassAccuracy(K, ignore_index=255, average="micro")(pred, target)
    assert scores["pAcc"] == pytest.approx(float(accuracy), abs=1e-6)


def test_update_accumulates_numpy_and_torch_of_any_shape():
    pred, target = random_maps(1)
    once = ConfusionMatrix(K)
    once.update(pred, target)
    parts = ConfusionMatrix(K)
    parts.update(pred[0].numpy().astype(np.uint8), target[0].numpy().astype(np.uint8))
    parts.update(pred[1:].reshape(-1), target[1:].reshape(-1))
    np.testing.assert_array_equal(parts.matrix, once.matrix)
    assert once.matrix.dtype == np.int64
    assert once.matrix.sum() == int((target != 255).sum())


def test_iou_is_zero_not_nan_for_missed_or_spurious_classes():
    confusion = ConfusionMatrix(3)
    confusion.update(np.array([0, 0, 1]), np.array([0, 2, 0]))
    iou = segmentation_scores(confusion.matrix)["per_class_iou"]
    np.testing.assert_allclose(iou, [1 / 3, 0.0, 0.0])


def test_bad_input_is_refused():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions must lie"):
        confusion.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="targets must lie"):
        confusion.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="shape"):
        confusion.update(np.zeros((2, 2), int), np.zeros(4, int))
    with pytest.raises(ValueError, match="integer"):
        confusion.update(np.zeros(2), np.zeros(2, int))


def test_known_unknown_and_harmonic_mean():
    matrix = np.diag([10, 10, 10, 10])
    matrix[0, 1] = 10  # class 0: IoU 1/2, class 1: IoU 1/2
    matrix[3, 2] = 30  # class 2: IoU 1/4, class 3: IoU 1/4
    scores = segmentation_scores(matrix, held_out_ids=[2, 3])
    assert scores["mIoU_known"] == pytest.approx(0.5)
    assert scores["mIoU_unknown"] == pytest.approx(0.25)
    assert scores["hIoU"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert scores["mIoU"] == pytest.approx(0.375)
    assert scores["pAcc"] == pytest.approx(40 / 80)
    plain = segmentation_scores(matrix)
    assert np.isnan(plain["mIoU_unknown"]) and np.isnan(plain["hIoU"]) and plain["mIoU_known"] == plain["mIoU"]
    with pytest.raises(ValueError, match="held_out_ids"):
        segmentation_scores(matrix, held_out_ids=[4])


def test_hungarian_recovers_a_permutation():
    rng = np.random.default_rng(0)
    permutation = rng.permutation(7)
    matrix = rng.integers(0, 5, (7, 7)) + 100 * np.eye(7, dtype=int)[permutation]
    np.testing.assert_array_equal(hungarian_mapping(matrix), permutation)


def test_hungarian_with_more_or_fewer_clusters_than_classes():
    matrix = np.array([[9, 0], [0, 8], [5, 1]])  # 3 clusters, 2 classes: the leftover goes to its majority class
    np.testing.assert_array_equal(hungarian_mapping(matrix), [0, 1, 0])
    mapping = hungarian_mapping(matrix.T)  # 2 clusters, 3 classes: one class stays unmatched
    np.testing.assert_array_equal(mapping, [0, 1])
