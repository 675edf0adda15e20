"""The share floor for classes named only at test time, measured on the training images without their labels.

One definition for the evaluate stage (held-out names appended to the dataset's) and for ``clips4 segment`` /
``clips4 export-masks`` (any name the student was not trained on), so what is segmented is what was scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from clips4.evaluation import argmax_shares, cosine_logits, language_logits, sample_pixels, share_floor_bias
from clips4.progress import track

Embedder = Callable[[list[int]], torch.Tensor]
"""Image indices -> embeddings [B,D,h,w]."""

# The share floor is measured on at most this many training images, evenly strided (all of the demo's 800).
FLOOR_IMAGES = 1024


def array_embedder(features) -> Embedder:
    """Embeddings [B,D,h,w] read from a stored [N,h,w,D] array (teacher features or cached student embeddings);
    a contiguous run of indices is read as one slice."""

    def embed(idx: list[int]) -> torch.Tensor:
        if list(idx) == list(range(idx[0], idx[-1] + 1)):
            rows = np.asarray(features[idx[0] : idx[-1] + 1])
        else:
            rows = np.stack([np.asarray(features[i]) for i in idx])
        return torch.from_numpy(rows).permute(0, 3, 1, 2).float()

    return embed


def new_class_ids(names: Sequence[Sequence[str]], known: Sequence[Sequence[str]]) -> list[int]:
    """Indices of the classes in ``names`` (each a list of synonyms) that share no name, case aside, with the
    ``known`` classes a student was trained towards: the classes named only now."""
    seen = {n.strip().lower() for synonyms in known for n in synonyms}
    return [k for k, synonyms in enumerate(names) if not seen & {n.strip().lower() for n in synonyms}]


def new_class_floor(
    teacher: Embedder,
    student: Embedder,
    images: Sequence[int],
    batch_size: int,
    text: torch.Tensor,
    centre: torch.Tensor | None,
    new: Sequence[int],
    names: Sequence[str],
    floor: float,
    pixels: int,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """The bias [K] that gives each class of ``new`` ``floor`` x MaskCLIP's share of the pixels of ``images`` (train
    split indices) in the student's argmax (:func:`clips4.evaluation.share_floor_bias`), and a table of both shares
    per class. ``teacher`` gives MaskCLIP's stored features of those images, ``student`` the student's embeddings
    at the test scales; ``pixels`` of the latter are sampled."""
    batches = [list(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
    teacher_share = argmax_shares(
        (cosine_logits(teacher(idx).to(device), text) for idx in track(batches, "teacher shares", unit="batch")),
        len(names),
    )
    sample = sample_pixels((student(idx) for idx in track(batches, "student shares", unit="batch")), pixels, seed)
    scores = language_logits(sample.to(device)[:, :, None, None], text, centre)[:, :, 0, 0].cpu()
    bias = share_floor_bias(scores, teacher_share, new, floor)
    table = pd.DataFrame({
        "class": list(names),
        "held_out": [k in new for k in range(len(names))],
        "maskclip_share": teacher_share.numpy(),
        "clips4_share": argmax_shares([scores], len(names)).numpy(),
        "bias": bias.numpy(),
        "clips4_share_with_bias": argmax_shares([scores + bias], len(names)).numpy(),
    })
    return bias.to(device), table
