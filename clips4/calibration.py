"""The share floor for classes named only at test time, measured on the training images without their labels.

One definition for the evaluate stage (held-out names appended to the dataset's; the student's and MaskCLIP's
test-time rows, :mod:`clips4.harness`) and for ``clips4 segment`` / ``clips4 export-masks`` (any name the student
was not trained on), so what is segmented is what was scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from clips4.evaluation import Embedder, cosine_logits, language_logits
from clips4.progress import track
from clips4.sampling import sample_pixels


def argmax_shares(scores: Iterable[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Share [K] of the pixels whose highest score is each class, over score maps [B,K,h,w] or rows [N,K]."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for s in scores:
        counts += torch.bincount(s.argmax(dim=1).flatten().cpu(), minlength=num_classes).double()
    if counts.sum() == 0:
        raise ValueError("no pixels to measure class shares on: the score maps are empty")
    return (counts / counts.sum()).float()


def share_floor_bias(scores: torch.Tensor, reference_share: torch.Tensor, classes: Sequence[int], floor: float,
                     passes: int = 3) -> torch.Tensor:
    """Bias [K] >= 0, non-zero only on ``classes``: the least that gives each of them at least ``floor`` x its
    ``reference_share`` [K] of the argmax over ``scores`` [N,K] (pixels of unlabelled calibration images).

    Why: the student keeps the teacher's majority for alike-looking pixels, so a class named only at test time that
    the teacher finds on a minority of its pixels can vanish from the student's argmax while still scoring highest
    on them (docs/method.md §9). Given the teacher's share as the reference, the bias is a
    quantile of each class's margin to the best other class; a few passes settle classes that compete with each
    other. Classes the student already gives their floor keep a bias of 0.
    """
    scores = scores.float()
    bias = torch.zeros(scores.shape[1])
    for _ in range(passes):
        for k in classes:
            need = floor * float(reference_share[k])
            if need <= 0:
                continue
            others = (scores + bias).index_fill(1, torch.tensor([k]), float("-inf")).max(dim=1).values
            bias[k] = max(0.0, float(torch.quantile(others - scores[:, k], min(need, 1.0))))
    return bias


def new_class_ids(names: Sequence[Sequence[str]], known: Sequence[Sequence[str]]) -> list[int]:
    """Indices of the classes in ``names`` (each a list of synonyms) that share no name, case aside, with the
    ``known`` classes a student was trained towards: the classes named only now."""
    seen = {n.strip().lower() for synonyms in known for n in synonyms}
    return [k for k, synonyms in enumerate(names) if not seen & {n.strip().lower() for n in synonyms}]


def new_class_floor(
    teacher: Embedder,
    student: Embedder,
    images: Sequence[int],
    *,
    batch_size: int,
    text: torch.Tensor,
    centre: torch.Tensor | None,
    new: Sequence[int],
    names: Sequence[str],
    floor: float,
    pixels: int,
    seed: int,
    device: torch.device,
    name: str = "clips4",
) -> tuple[torch.Tensor, pd.DataFrame]:
    """The bias [K] that gives each class of ``new`` ``floor`` x MaskCLIP's share of the pixels of ``images`` (train
    split indices) in the argmax of the scored maps (:func:`share_floor_bias`), and a table of both shares per
    class. ``teacher`` gives MaskCLIP's stored features of those images (the reference), ``student`` the maps being
    floored (the student's, or MaskCLIP's own at the test scales), compared with ``text`` after re-centring from
    ``centre`` (:func:`clips4.evaluation.language_logits`); ``pixels`` of them are sampled. The table's columns
    are ``class``, ``held_out``, ``maskclip_share``, ``<name>_share``, ``bias`` and ``<name>_share_with_bias``."""
    batches = [list(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
    teacher_share = argmax_shares(
        (cosine_logits(teacher(idx).to(device), text) for idx in track(batches, "teacher shares", unit="batch")),
        len(names),
    )
    sample = sample_pixels((student(idx) for idx in track(batches, f"{name} shares", unit="batch")), pixels, seed)
    scores = language_logits(sample.to(device)[:, :, None, None], text, centre)[:, :, 0, 0].cpu()
    bias = share_floor_bias(scores, teacher_share, new, floor)
    table = pd.DataFrame({
        "class": list(names),
        "held_out": [k in new for k in range(len(names))],
        "maskclip_share": teacher_share.numpy(),
        f"{name}_share": argmax_shares([scores], len(names)).numpy(),
        "bias": bias.numpy(),
        f"{name}_share_with_bias": argmax_shares([scores + bias], len(names)).numpy(),
    })
    return bias.to(device), table
