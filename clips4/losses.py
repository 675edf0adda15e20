"""CLIP-S4's three losses on flattened valid pixels (docs/method.md §2-4). Each returns a scalar tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def segment_means(x: torch.Tensor, seg: torch.Tensor, num: int) -> torch.Tensor:
    """L2-normalised mean of the rows of `x` [N,C] in each of `num` segments (`seg` [N]); empty segments give 0."""
    sums = x.new_zeros(num, x.shape[1]).index_add(0, seg, x)
    return F.normalize(sums, dim=1)


def positive_candidates(seg_region: torch.Tensor) -> torch.Tensor:
    """Segments of each segment's positive group, padded with -1: [S, G] (G = the largest group size).

    Gathering the few positives per pixel from this table avoids an N x S positive mask.
    """
    _, group = torch.unique(seg_region, return_inverse=True)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=order.device) - starts[group[order]]
    table = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=order.device)
    table[group[order], slot] = order
    return table[group]


class _PixelSegmentNCE(torch.autograd.Function):
    """Per-pixel contrastive loss with a hand-written backward.

    The N x S logits dominate time and memory on CPU; autograd through logsumexp would keep several N x S
    temporaries. Here forward turns the logits into the softmax in place and backward reuses it: the gradient wrt
    the logits is softmax(all) - softmax(positives), the latter only [N,G]. Computed in at least float32 (no autocast).
    """

    @staticmethod
    def forward(ctx, z, seg_emb, kappa, drop, cand, positive):  # type: ignore[override]
        with torch.autocast(z.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(z.dtype, seg_emb.dtype), torch.float32)
            zf, vf = z.to(dtype), seg_emb.to(dtype)
            logits = kappa * zf @ vf.T  # [N,S]
            logits.index_put_(drop, torch.tensor(float("-inf"), device=z.device, dtype=dtype))
            pos = logits.gather(1, cand).masked_fill(~positive, float("-inf"))
            lse_pos = torch.logsumexp(pos, 1, keepdim=True)
            top = logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(1, keepdim=True)
            probs.div_(total)
            ctx.save_for_backward(zf, vf, probs, (pos - lse_pos).exp(), cand)
        ctx.kappa = kappa
        ctx.dtypes = (z.dtype, seg_emb.dtype)
        return (top + total.log() - lse_pos).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        zf, vf, probs, pos_probs, cand = ctx.saved_tensors
        scale = grad.to(probs.dtype)[:, None] * ctx.kappa
        dlogits = (probs * scale).scatter_add_(1, cand, -pos_probs * scale)
        return (dlogits @ vf).to(ctx.dtypes[0]), (dlogits.T @ zf).to(ctx.dtypes[1]), None, None, None, None


def pixel_segment_contrastive(z: torch.Tensor, seg: torch.Tensor, seg_emb: torch.Tensor, seg_region: torch.Tensor,
                              kappa: float) -> torch.Tensor:
    """Mean over pixels of -log( sum_{S+} exp(k<z,v>) / sum_{S+ and S-} exp(k<z,v>) ).

    `z` [N,D] unit pixel embeddings, `seg` [N] each pixel's segment, `seg_emb` [S,D] unit segment embeddings,
    `seg_region` [S] positive-group id per segment. S+ = the other segments of the pixel's group (its own segment
    when there is none); S- = the segments of every other group. The pixel's own segment is therefore in the
    denominator only when it is the positive.
    """
    if z.shape[0] != seg.shape[0] or seg_emb.shape[0] != seg_region.shape[0]:
        raise ValueError(f"contrastive loss: z {tuple(z.shape)} / seg {tuple(seg.shape)} and seg_emb "
                         f"{tuple(seg_emb.shape)} / seg_region {tuple(seg_region.shape)} must agree in length")
    cand = positive_candidates(seg_region)[seg]  # [N,G]
    positive = (cand >= 0) & (cand != seg[:, None])
    own_is_positive = ~positive.any(1)
    cand[own_is_positive, 0] = seg[own_is_positive]
    positive[own_is_positive, 0] = True
    rows = torch.nonzero(~own_is_positive).squeeze(1)
    return _PixelSegmentNCE.apply(z, seg_emb, float(kappa), (rows, seg[rows]), cand.clamp(min=0), positive).mean()


def relational_contrastive(z: torch.Tensor, seg_emb: torch.Tensor, clip_pix: torch.Tensor, clip_seg: torch.Tensor,
                           kappa: float, kappa_teacher: float) -> torch.Tensor:
    """Mean over pixels of CE(softmax_s(kappa_t <c_p, u_s>), softmax_s(kappa <z_p, v_s>)).

    The pixel-segment contrast with the teacher's relations as its targets: `clip_pix` [N,D] the CLIP feature at
    each pixel and `clip_seg` [S,D] CLIP pooled over each segment (both unit, constant). Segments the teacher finds
    alike share a pixel's probability mass instead of being pushed apart as negatives, so superpixels of one stuff
    stay together while two things the teacher tells apart are separated.
    """
    if z.shape[0] != clip_pix.shape[0] or seg_emb.shape[0] != clip_seg.shape[0]:
        raise ValueError(f"relational contrast: z {tuple(z.shape)} / clip_pix {tuple(clip_pix.shape)} and seg_emb "
                         f"{tuple(seg_emb.shape)} / clip_seg {tuple(clip_seg.shape)} must agree in length")
    with torch.no_grad():
        target = torch.softmax(kappa_teacher * clip_pix.float() @ clip_seg.float().T, dim=1)
    log_p = torch.log_softmax(kappa * z.float() @ seg_emb.float().T, dim=1)
    return -(target * log_p).sum(1).mean()


def embedding_consistency(seg_emb: torch.Tensor, clip_seg: torch.Tensor) -> torch.Tensor:
    """mean_s (1 - <v_s, u_s>): student segments toward the (constant) CLIP segment embeddings."""
    return (1 - (seg_emb * clip_seg.detach()).sum(1)).mean()


def known_confidence(clip_seg: torch.Tensor, known_text: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(peak probability [S], class [S]) of CLIP's zero-shot softmax over the known texts, softmax(scale <u_s, t_k>):
    how surely CLIP names each segment as one of the known classes."""
    prob = torch.softmax(scale * clip_seg.float() @ known_text.float().T, dim=1)
    return prob.max(dim=1)


def semantic_labels(clip_seg: torch.Tensor, targets: torch.Tensor, num_known: int, rule: str = "nearest",
                    scale: float = 100.0, confidence: float = 0.5, floor: float = -1.0) -> torch.Tensor:
    """Each segment's label, an index into ``targets`` (the ``num_known`` known texts first, then the prototypes).

    ``nearest``: the nearest target, argmax_k <u_s, T_k>. Prototypes are means of CLIP image features, texts are not,
    so across the modality gap a prototype is nearly always nearer. ``known_first`` asks CLIP's own zero-shot
    question first: a segment whose softmax over the known texts (at CLIP's logit ``scale``) peaks at
    ``confidence`` or more, and whose cosine to that text is at least ``floor``, gets that class; any other segment
    the nearest prototype (docs/method.md §4). The softmax alone is sure of things no known class names (it must
    pick one of them); the floor leaves those, which lie far from every known text, to the prototypes.
    """
    with torch.no_grad():
        sim = clip_seg.float() @ targets.float().T
        if rule == "nearest" or num_known in (0, len(targets)):
            return sim.argmax(1)
        if rule != "known_first":
            raise ValueError(f"unknown labelling rule {rule!r}; use 'nearest' or 'known_first'")
        peak, known = known_confidence(clip_seg, targets[:num_known], scale)
        sure = (peak >= confidence) & (sim.gather(1, known[:, None])[:, 0] >= floor)
        return torch.where(sure, known, num_known + sim[:, num_known:].argmax(1))


def semantic_consistency(seg_emb: torch.Tensor, clip_seg: torch.Tensor, targets: torch.Tensor,
                         tau: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """CE(softmax(<v_s, T> / tau), y_s): the student's segment label distribution over the target set (known-class
    texts + unknown prototypes, fixed here) must pick the teacher's label ``labels`` (:func:`semantic_labels`; by
    default the nearest target to the CLIP segment embedding ``clip_seg``)."""
    targets = targets.detach()
    if labels is None:
        labels = semantic_labels(clip_seg.detach(), targets, 0)
    return F.cross_entropy(seg_emb @ targets.T / tau, labels)
