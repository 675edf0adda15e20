"""Agreement and speed of clips4's ConfusionMatrix against torchmetrics' MulticlassJaccardIndex.

Random predictions and targets (10 x 512 x 512, 21 classes, 10 % ignored pixels); the per-class IoU of both must
agree, and the ratio of median times is printed last (below 1 means clips4 is faster).

    python bench/metrics.py [--classes 21] [--repeat 7] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from clips4.device import resolve_device
from clips4.metrics import ConfusionMatrix, segmentation_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--shape", type=int, nargs=3, default=(10, 512, 512))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, args.classes, args.shape, generator=g)
    pred = torch.where(torch.rand(args.shape, generator=g) < 0.5, target, torch.randint(0, args.classes, args.shape))
    target[torch.rand(args.shape, generator=g) < 0.1] = 255
    pred, target = pred.to(device), target.to(device)

    def ours() -> np.ndarray:
        confusion = ConfusionMatrix(args.classes)
        confusion.update(pred, target)
        return segmentation_scores(confusion.matrix)["per_class_iou"]

    def reference() -> np.ndarray:
        metric = MulticlassJaccardIndex(args.classes, ignore_index=255, average=None).to(device)
        metric.update(pred, target)
        return metric.compute().cpu().numpy()

    times: dict[str, list[float]] = {"clips4": [], "torchmetrics": []}
    results = {}
    for i in range(args.repeat + 1):  # the first round is a warm-up
        for name, fn in (("clips4", ours), ("torchmetrics", reference)):
            start = time.perf_counter()
            results[name] = fn()
            if i:
                times[name].append(time.perf_counter() - start)
    difference = np.abs(results["clips4"] - results["torchmetrics"]).max()
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{tuple(args.shape)} pixels, {args.classes} classes, device {device}")
    print(f"max abs difference of per-class IoU: {difference:.2e}")
    for name, median in medians.items():
        print(f"{name:>12}: median {median * 1000:.1f} ms over {args.repeat} runs")
    print(f"ConfusionMatrix/torchmetrics time ratio: {medians['clips4'] / medians['torchmetrics']:.3f}")


if __name__ == "__main__":
    main()
