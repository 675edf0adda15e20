"""Cost of MaskCLIP dense extraction relative to a plain CLIP image forward on the same batch.

The dense path replaces the last block's attention by its value path and projects every token instead of one, so
it should cost about the same as ``encode_image`` (goal: ratio <= 1.05). Random weights (no download needed).

    python bench/extract.py [--model ViT-B-16] [--batch 4] [--size 224] [--repeat 7] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import open_clip
import torch

from clips4.device import resolve_device
from clips4.maskclip import dense_features


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).to(device).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    runs = {
        "encode_image": lambda: model.encode_image(images),
        "dense": lambda: dense_features(model, images),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=args.amp and device.type == "cuda"):
        for i in range(args.warmup + args.repeat):
            for name, fn in runs.items():  # interleaved, so drifts in machine load hit both alike
                elapsed = timed(fn, device)
                if i >= args.warmup:
                    times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"model {args.model}, batch {args.batch}x{args.size}px, device {device}, amp {args.amp}")
    for name, median in medians.items():
        print(f"{name:>12}: median {median * 1000:.1f} ms over {args.repeat} runs")
    print(f"dense/encode_image time ratio: {medians['dense'] / medians['encode_image']:.3f}")


if __name__ == "__main__":
    main()
