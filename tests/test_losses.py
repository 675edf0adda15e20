import math

import pytest
import torch
import torch.nn.functional as F

from clips4.losses import (
    embedding_consistency,
    pixel_segment_contrastive,
    positive_candidates,
    relational_contrastive,
    segment_means,
    semantic_consistency,
    semantic_labels,
)


def literal_contrastive(z, seg, seg_emb, group, kappa):
    """docs/method.md §2 written out pixel by pixel."""
    losses = []
    for p in range(z.shape[0]):
        own = int(seg[p])
        positives = [s for s in range(seg_emb.shape[0]) if group[s] == group[own] and s != own] or [own]
        negatives = [s for s in range(seg_emb.shape[0]) if group[s] != group[own]]
        logit = kappa * seg_emb @ z[p]
        losses.append(-(logit[positives].logsumexp(0) - logit[positives + negatives].logsumexp(0)))
    return torch.stack(losses).mean()


def test_segment_means_are_normalised_and_empty_segments_are_zero():
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    means = segment_means(x, torch.tensor([0, 0, 2, 2]), num=3)
    torch.testing.assert_close(means, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))


def test_positive_candidates_lists_each_group():
    table = positive_candidates(torch.tensor([7, 3, 7, 7, 5]))
    assert table.shape == (5, 3)
    assert sorted(table[0].tolist()) == [0, 2, 3]
    assert table[1].tolist() == [1, -1, -1]
    assert torch.equal(table[2], table[0]) and torch.equal(table[3], table[0])


def test_two_segments_by_hand():
    """Different groups: each pixel's only positive is its own segment; denominator = both segments."""
    kappa = 2.0
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    loss = pixel_segment_contrastive(z, torch.tensor([0, 1]), v, torch.tensor([0, 1]), kappa)
    pixel0 = -math.log(math.exp(2 * 0.6) / (math.exp(2 * 0.6) + math.exp(2 * 0.8)))
    pixel1 = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0)))
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2, rel=1e-6)


def test_own_segment_is_left_out_when_the_group_has_another():
    """Segments 0,1 share a group: pixel in 0 has S+ = {1}, S- = {2}; its own segment 0 is in neither."""
    kappa = 3.0
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z = torch.tensor([[0.8, 0.6]])
    loss = pixel_segment_contrastive(z, torch.tensor([0]), v, torch.tensor([4, 4, 9]), kappa)
    pos, neg = math.exp(3 * 0.96), math.exp(3 * 0.6)
    assert loss.item() == pytest.approx(-math.log(pos / (pos + neg)), rel=1e-6)


def test_contrastive_matches_the_literal_formula_in_value_and_gradient(device):
    torch.manual_seed(0)
    seg = torch.randint(0, 9, (50,), device=device)
    group = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4], device=device)
    z = F.normalize(torch.randn(50, 6, dtype=torch.float64, device=device), dim=1).requires_grad_()
    v = F.normalize(torch.randn(9, 6, dtype=torch.float64, device=device), dim=1).requires_grad_()
    loss = pixel_segment_contrastive(z, seg, v, group, 5.0)
    reference = literal_contrastive(z, seg, v, group, 5.0)
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, (z, v))
    expected = torch.autograd.grad(reference, (z, v))
    torch.testing.assert_close(grads, expected)


def test_contrastive_gradient_through_segment_means():
    torch.manual_seed(1)
    seg = torch.randint(0, 6, (30,))
    group = torch.tensor([0, 0, 1, 2, 2, 3])
    z = F.normalize(torch.randn(30, 4, dtype=torch.float64), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: pixel_segment_contrastive(z, seg, segment_means(z, seg, 6), group, 4.0), (z,))


def test_separated_embeddings_beat_swapped_groups():
    """Pixels equal to their segment embedding, positives identical: low loss; swapping the groups raises it."""
    v = torch.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]]  # 8 segments, groups of two with the same embedding
    seg = torch.arange(8).repeat_interleave(3)
    z = v[seg]
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    swapped = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0])
    good = pixel_segment_contrastive(z, seg, v, groups, 16.0)
    bad = pixel_segment_contrastive(z, seg, v, swapped, 16.0)
    assert good.item() < 1e-5 < 1.0 < bad.item()


def test_contrastive_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="agree in length"):
        pixel_segment_contrastive(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2),
                                  torch.zeros(2, dtype=torch.long), 1.0)


def test_relational_contrast_is_least_when_the_student_keeps_the_teachers_relations():
    """CE(q, p) >= H(q), equal when the student's softmax is the teacher's; swapping two segments raises it."""
    torch.manual_seed(0)
    clip_seg = F.normalize(torch.randn(6, 8), dim=1)
    clip_pix = F.normalize(clip_seg[torch.tensor([0, 1, 2, 3, 4, 5, 0, 2])] + 0.3 * torch.randn(8, 8), dim=1)
    q = torch.softmax(20.0 * clip_pix @ clip_seg.T, dim=1)
    entropy = -(q * q.log()).sum(1).mean()
    z, v = clip_pix.clone().requires_grad_(), clip_seg.clone().requires_grad_()
    same = relational_contrastive(z, v, clip_pix, clip_seg, kappa=20.0, kappa_teacher=20.0)
    assert same.item() == pytest.approx(entropy.item(), rel=1e-5)
    same.backward()
    assert z.grad.abs().max() < 1e-5 and v.grad.abs().max() < 1e-5  # a minimum
    swapped = relational_contrastive(clip_pix, clip_seg[[1, 0, 2, 3, 4, 5]], clip_pix, clip_seg, 20.0, 20.0)
    assert swapped.item() > entropy.item() + 0.1
    with pytest.raises(ValueError, match="agree in length"):
        relational_contrastive(z[:3], v, clip_pix, clip_seg, 1.0, 1.0)


def test_embedding_consistency():
    v = F.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    assert embedding_consistency(v, v.detach().clone()).abs().item() < 1e-6
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = embedding_consistency(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), u)
    assert loss.item() == pytest.approx(1.5)
    assert not loss.requires_grad  # the CLIP side is a constant


def test_semantic_consistency_is_cross_entropy_to_the_teacher_label():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    v = torch.tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    u = torch.tensor([[0.0, 1.0], [-0.8, 0.6]])  # teacher labels: 1 and 2
    loss = semantic_consistency(v, u, targets, tau=0.5)
    expected = F.cross_entropy(torch.tensor([[1.2, 1.6, -1.2], [2.0, 0.0, -2.0]]), torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


# Known texts along e0 and e1; prototypes are means of image features, so they sit right on the segments.
KNOWN_TEXTS = torch.eye(4)[:2]
PROTOTYPES = F.normalize(torch.tensor([[0.6, 0.0, 0.8, 0.0], [0.5, 0.5, 0.0, 0.7]]), dim=1)
SEGMENTS = F.normalize(torch.tensor([
    [0.6, 0.0, 0.8, 0.0],  # CLIP names it class 0 surely (cos 0.6 vs 0), yet prototype 0 is nearer than any text
    [0.5, 0.5, 0.0, 0.7],  # CLIP cannot tell class 0 from class 1: it is left to the prototypes
    [0.0, 0.9, 0.1, 0.4],  # surely class 1
]), dim=1)


def test_known_first_gives_confident_segments_their_class_and_the_rest_the_nearest_prototype():
    targets = torch.cat([KNOWN_TEXTS, PROTOTYPES])
    labels = semantic_labels(SEGMENTS, targets, 2, "known_first", scale=100.0, confidence=0.9)
    assert labels.tolist() == [0, 3, 1]
    # the plain nearest target hands the first segment to a prototype: this rule must not revert to it
    assert semantic_labels(SEGMENTS, targets, 2, "nearest").tolist() == [2, 3, 1]
    assert (SEGMENTS @ targets.T).argmax(1).tolist() == [2, 3, 1]
    # a soft logit scale makes CLIP unsure of the first segment too
    assert semantic_labels(SEGMENTS, targets, 2, "known_first", scale=1.0, confidence=0.9).tolist() == [2, 3, 3]
    # a cosine floor leaves a segment CLIP is sure of but that lies far from the text (cos 0.6) to the prototypes
    assert semantic_labels(SEGMENTS, targets, 2, "known_first", confidence=0.9, floor=0.7).tolist() == [2, 3, 1]
    # no prototypes: every segment takes its nearest known class
    assert semantic_labels(SEGMENTS, KNOWN_TEXTS, 2, "known_first").tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="unknown labelling rule"):
        semantic_labels(SEGMENTS, targets, 2, "closest")


def test_semantic_consistency_learns_the_given_labels():
    targets = torch.cat([KNOWN_TEXTS, PROTOTYPES])
    v = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = semantic_labels(SEGMENTS, targets, 2, "known_first", confidence=0.9)
    loss = semantic_consistency(v, SEGMENTS, targets, 0.07, labels=labels)
    assert loss.item() == pytest.approx(F.cross_entropy(v @ targets.T / 0.07, labels).item(), rel=1e-6)
    assert semantic_consistency(v, SEGMENTS, targets, 0.07).item() == pytest.approx(
        F.cross_entropy(v @ targets.T / 0.07, torch.tensor([2, 3, 1])).item(), rel=1e-6)
