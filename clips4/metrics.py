"""Segmentation metrics from one confusion matrix accumulated over every pixel of a split (docs/method.md §6).

Accumulating counts (not per-image scores) is the standard protocol of the baselines' repos: mIoU is the mean over
classes of TP / (TP + FP + FN) summed over the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from clips4.data.records import IGNORE_INDEX


class ConfusionMatrix:
    """Counts of (target, prediction) pairs: ``matrix[t, p]``, rows = target; target ``ignore_index`` is skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add integer predictions and targets of the same shape (torch on any device, or numpy)."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class ids; take the argmax of scores first")
        if pred.numel() == 0:
            return
        pred, target = pred.reshape(-1).to(target.device, torch.int64), target.reshape(-1).to(torch.int64)
        k = self.num_classes
        if int(pred.min()) < 0 or int(pred.max()) >= k:
            raise ValueError(f"predictions must lie in [0, {k}), got range [{int(pred.min())}, {int(pred.max())}]")
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            raise ValueError(
                f"targets must lie in [0, {k}) or equal ignore_index {self.ignore_index}, got range "
                f"[{int(target.min())}, {int(target.max())}]"
            )
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.matrix += counts.cpu().numpy().reshape(k, k)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; nan (without a warning) when there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def segmentation_scores(matrix: np.ndarray, held_out_ids: Sequence[int] = ()) -> dict:
    """mIoU, pixel accuracy and the known/unknown split of a [K,K] confusion matrix (rows = target).

    A class absent from both target and prediction has IoU nan and is left out of every mean. ``mIoU_known`` and
    ``mIoU_unknown`` average the classes outside/inside ``held_out_ids``; hIoU = 2SU/(S+U) (nan without held-out
    classes).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    k = matrix.shape[0]
    held = sorted(set(held_out_ids))
    if any(not 0 <= i < k for i in held):
        raise ValueError(f"held_out_ids {held} must lie in [0, {k})")
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    known = np.setdiff1d(np.arange(k), held)
    total = matrix.sum()
    scores = {
        "mIoU": _nanmean(iou),
        "pAcc": float(tp.sum() / total) if total else float("nan"),
        "mIoU_known": _nanmean(iou[known]),
        "mIoU_unknown": _nanmean(iou[held]) if held else float("nan"),
        "per_class_iou": iou,
    }
    s, u = scores["mIoU_known"], scores["mIoU_unknown"]
    scores["hIoU"] = 2 * s * u / (s + u) if s + u > 0 else (0.0 if s + u == 0 else float("nan"))
    return scores


def hungarian_mapping(matrix: np.ndarray) -> np.ndarray:
    """Map each cluster (row) to a class (column) maximising matched pixels; works for any #clusters vs #classes.

    The one-to-one part is scipy's ``linear_sum_assignment``; clusters left over when there are more clusters than
    classes go to the class they overlap most.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"expected a non-empty clusters x classes matrix, got shape {matrix.shape}")
    mapping = matrix.argmax(axis=1)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping[rows] = cols
    return mapping
