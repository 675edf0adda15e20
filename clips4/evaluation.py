"""The three evaluation protocols of docs/method.md §6 on frozen pixel embeddings: language, unsupervised, linear probe.

Layout convention: every embedding map here is [B,D,h,w] (torch conv layout) at feature resolution; labels are
int [B,H,W] at label resolution with 255 = ignore. Class scores are computed at feature resolution and upsampled
bilinearly to the label size before the argmax, so all methods are scored on the same full-resolution pixels.
Embedding batches may live on the CPU in float16; each is moved to ``device`` and cast to float32 when used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clips4.data.records import IGNORE_INDEX
from clips4.maskclip import LOGIT_SCALE
from clips4.metrics import ConfusionMatrix, hungarian_mapping, segmentation_scores
from clips4.progress import track
from clips4.prototypes import move_across_gap, spherical_kmeans
from clips4.sampling import sample_pixels

DROPPED_SCORE = -1e30
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""Pairs (embeddings [B,D,h,w], labels [B,H,W])."""
Embedder = Callable[[list[int]], torch.Tensor]
"""Image indices of a split -> embeddings [B,D,h,w]: maps read or computed on demand, so a split need not fit memory."""


def array_embedder(features) -> Embedder:
    """Embeddings [B,D,h,w] read from a stored [N,h,w,D] array (MaskCLIP's features, cached student maps, any array
    indexable by image); a contiguous run of indices is read as one slice."""

    def embed(idx: list[int]) -> torch.Tensor:
        if list(idx) == list(range(idx[0], idx[-1] + 1)):
            rows = np.asarray(features[idx[0] : idx[-1] + 1])
        else:
            rows = np.stack([np.asarray(features[i]) for i in idx])
        return torch.from_numpy(rows).permute(0, 3, 1, 2).float()

    return embed


def cosine_logits(emb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scores [B,K,h,w] = 100 x cosine between every pixel of ``emb`` [B,D,h,w] and every row of ``weights`` [K,D]."""
    if emb.ndim != 4 or weights.ndim != 2 or emb.shape[1] != weights.shape[1]:
        raise ValueError(
            f"expected embeddings [B,D,h,w] and weights [K,D] with the same D, got {tuple(emb.shape)} and "
            f"{tuple(weights.shape)}"
        )
    emb = F.normalize(emb.float(), dim=1)
    return LOGIT_SCALE * torch.einsum("bdhw,kd->bkhw", emb, F.normalize(weights.to(emb), dim=1))


def upsample_argmax(scores: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Labels int64 [B,H,W]: bilinear upsampling of ``scores`` [B,K,h,w] to ``out_size``, then argmax over K.

    One image at a time, so the full-resolution [K,H,W] scores of a single image are the peak memory. Scores of
    -inf (classes dropped by prompt denoising) become a huge finite negative first, since interpolation weights of 0
    times -inf would give nan.
    """
    scores = torch.nan_to_num(scores.float(), neginf=DROPPED_SCORE)
    upsample = partial(F.interpolate, size=tuple(out_size), mode="bilinear", align_corners=False)
    return torch.cat([upsample(s[None]).argmax(dim=1) for s in scores])


def cone_shift(weights: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """[D] offset from ``centre``, where a student's unit embeddings sit (the mean of them over its training
    images), to the centre of the classes ``weights`` [K,D] named now (their mean text embedding)."""
    return F.normalize(weights.float(), dim=1).mean(0) - centre.to(weights.device).float()


def language_logits(emb: torch.Tensor, weights: torch.Tensor, centre: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The language protocol's scores [B,K,h,w]: :func:`cosine_logits` of ``emb`` [B,D,h,w] against class texts.

    A student whose L_emb targets were CLIP features moved across the modality gap of the known classes lives
    near their text cone, not on it, and not as close to the texts of classes it never saw. Given its embedding
    ``centre`` [D] (:func:`clips4.inference.embedding_centre`), its embeddings first move by :func:`cone_shift`,
    the gap measured on the student and re-centred on the classes named now (held-out names appended at test
    time, or a user's own), so no class is favoured for having been known at training. ``bias`` [K] is added to
    the scores (the share floor, :func:`clips4.calibration.share_floor_bias`).
    """
    if centre is not None:
        emb = move_across_gap(emb.float(), cone_shift(weights, centre))
    scores = cosine_logits(emb, weights)
    return scores if bias is None else scores + bias.to(scores).view(1, -1, 1, 1)


def predict_language(
    emb: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int], centre: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Language-driven segmentation int64 [B,H,W]: nearest class text embedding per pixel (docs/method.md §6), scored
    by :func:`language_logits`."""
    return upsample_argmax(language_logits(emb, text, centre, bias), out_size)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of int labels [B,H,W] to ``size`` (e.g. feature resolution for the probe)."""
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].to(labels.dtype)


def _reiterable(batches: Batches) -> Batches:
    if iter(batches) is batches:
        raise TypeError("batches are read more than once; pass a list or a re-iterable object, not a generator")
    return batches


@torch.no_grad()
def score_classifier(
    batches: Batches,
    classify: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    device: torch.device,
    held_out_ids: Sequence[int] = (),
    ignore_index: int = IGNORE_INDEX,
) -> tuple[dict, np.ndarray]:
    """Scores (see :func:`segmentation_scores`) and the confusion matrix of ``classify`` over all ``batches``.

    ``classify`` maps float32 embeddings [B,D,h,w] on ``device`` to class scores [B,K,h,w]; e.g.
    ``functools.partial(cosine_logits, weights=text)`` for the language protocol or a trained probe.
    """
    confusion = ConfusionMatrix(num_classes, ignore_index)
    for emb, labels in track(batches, "scoring", unit="batch"):
        labels = torch.as_tensor(labels).to(device)
        scores = classify(emb.to(device).float())
        confusion.update(upsample_argmax(scores, labels.shape[-2:]), labels)
    return segmentation_scores(confusion.matrix, held_out_ids), confusion.matrix


# ------------------------------------------------------------------------------------------------- unsupervised
@dataclass
class Clustering:
    """What :func:`unsupervised_segmentation` found: scores, k-means ``centroids`` [K,D], cluster->class ``mapping``."""

    scores: dict
    centroids: torch.Tensor
    mapping: np.ndarray

    def predict(self, emb: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Class labels int64 [B,H,W] of embeddings [B,D,h,w]: nearest centroid, mapped to its matched class."""
        clusters = upsample_argmax(cosine_logits(emb, self.centroids.to(emb.device)), out_size)
        return torch.as_tensor(self.mapping, device=clusters.device)[clusters]


def unsupervised_segmentation(
    batches: Batches,
    num_classes: int,
    device: torch.device,
    seed: int = 0,
    sample_size: int = 100_000,
    iterations: int = 25,
    ignore_index: int = IGNORE_INDEX,
) -> Clustering:
    """K-means (K = ``num_classes``) on a pixel sample, every pixel assigned, clusters matched to classes (Hungarian).

    ``batches`` is read twice (sample, then assign) and must be re-iterable. The sample ignores labels; mIoU and pAcc
    come from the cluster-vs-class confusion after the one-to-one matching.
    """
    batches = _reiterable(batches)
    sample = sample_pixels((emb for emb, _ in batches), sample_size, seed)
    if len(sample) < num_classes:
        raise ValueError(f"k-means with {num_classes} clusters needs at least {num_classes} pixels, got {len(sample)}")
    unit = np.ascontiguousarray(F.normalize(sample.float(), dim=1).numpy())
    centroids = torch.from_numpy(spherical_kmeans(unit, num_classes, iterations, seed, max(len(unit), 1)).centroids)
    classify = partial(cosine_logits, weights=centroids.to(device))
    _, matrix = score_classifier(batches, classify, num_classes, device, ignore_index=ignore_index)
    mapping = hungarian_mapping(matrix.T)
    matched = np.zeros_like(matrix)
    np.add.at(matched.T, mapping, matrix.T)  # merge the columns of clusters mapped to the same class
    return Clustering(segmentation_scores(matched), centroids, mapping)


# -------------------------------------------------------------------------------------------------- linear probe
ProbeReader = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
"""Image indices of the train split (ascending) -> (embeddings [B,D,h,w], int labels [B,h,w] at the same
resolution): read on demand, so the split need not fit memory."""


def train_linear_probe(
    read: ProbeReader,
    num_images: int,
    num_classes: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
    batch_size: int = 16,
    ignore_index: int = IGNORE_INDEX,
) -> nn.Conv2d:
    """A 1x1 conv probe [D -> K] trained with cross-entropy on frozen embeddings (transfer protocol, docs/method.md §6).

    The ``num_images`` images of the train split are streamed through ``read``, at most ``batch_size`` at a time
    (any float dtype, moved to ``device``): once in order for the channel moments, then once per epoch in a seeded
    random order of images, so memory holds one batch whatever the split's size. Images are shuffled one by one, not
    in runs, since a split stored in class order would otherwise give one-class batches; each batch's images are
    asked for in ascending order (the order within a batch does not change its gradient).

    The probe learns on channels standardised with the train split's own mean and standard deviation, folded into
    the returned conv afterwards (it still reads the raw embeddings): unit-length embeddings of a few hundred dims
    have per-channel spreads near 1/sqrt(D), on which plain SGD moves the logits so slowly that a few epochs end far
    from the optimum, and the score would measure the optimiser rather than the embeddings. SGD with momentum 0.9 and
    a cosine-decayed ``lr``; zero-initialised, so the convex problem has a seed-independent start and ``seed`` only
    orders the images.
    """
    if num_images < 1:
        raise ValueError("the linear probe needs at least one training image")
    runs = (list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size))
    mean, std = channel_moments((_probe_batch(read, idx)[0] for idx in runs), device)
    probe = nn.Conv2d(len(mean), num_classes, kernel_size=1).to(device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = -(-num_images // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in track(range(epochs), "linear probe", unit="epoch"):
        for idx in torch.randperm(num_images, generator=generator).split(batch_size):
            emb, labels = _probe_batch(read, sorted(idx.tolist()))
            labels = labels.to(device).long()
            if not (labels != ignore_index).any():
                continue
            standard = (emb.to(device).float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            loss = F.cross_entropy(probe(standard), labels, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():  # w . (x - mean) / std + b  ==  (w / std) . x + (b - w . mean / std)
        weight = probe.weight / std.view(1, -1, 1, 1)
        probe.bias -= (weight.flatten(1) * mean).sum(1)
        probe.weight.copy_(weight)
    return probe.eval()


def _probe_batch(read: ProbeReader, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    emb, labels = read(idx)
    if emb.ndim != 4 or tuple(labels.shape) != (len(idx), *emb.shape[2:]) or len(emb) != len(idx):
        raise ValueError(
            f"the probe's reader must give embeddings [B,D,h,w] and labels [B,h,w] at the same resolution for "
            f"{len(idx)} images, got {tuple(emb.shape)} and {tuple(labels.shape)}; use resize_labels"
        )
    return emb, labels


def channel_moments(batches: Iterable[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation [D] over all pixels of the embedding ``batches`` [B,D,h,w] (any
    float dtype, e.g. float16 on the CPU), accumulated in float64 one batch at a time; constant channels get a
    spread of 1."""
    total = squares = None
    count = 0
    for emb in batches:
        x = emb.to(device).double()
        total = x.sum((0, 2, 3)) if total is None else total + x.sum((0, 2, 3))
        squares = (x * x).sum((0, 2, 3)) if squares is None else squares + (x * x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None or count == 0:
        raise ValueError("channel moments need at least one pixel")
    mean = total / count
    std = (squares / count - mean**2).clamp(min=0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()
