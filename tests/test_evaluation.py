"""Evaluation protocols on toy embeddings whose right answer is known."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clips4.evaluation import (
    array_embedder,
    channel_moments,
    cosine_logits,
    language_logits,
    predict_language,
    resize_labels,
    score_classifier,
    train_linear_probe,
    unsupervised_segmentation,
    upsample_argmax,
)

CPU = torch.device("cpu")
D, K = 16, 4


def toy_split(seed: int, images: int = 6, noise: float = 0.15):
    """Class maps on an 8x8 grid, labels = the maps at 16x16 (nearest), embeddings = a class direction + noise."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(123)), dim=1)
    coarse = torch.randint(0, K, (images, 4, 4), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    emb = directions[coarse].permute(0, 3, 1, 2) + noise * torch.randn(images, D, 8, 8, generator=g)
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    labels[:, :2, :2] = 255
    return F.normalize(emb, dim=1).half(), labels.to(torch.uint8), directions


def reader(emb: torch.Tensor, labels: torch.Tensor, asked: list[list[int]] | None = None):
    """(read, number of images) of in-memory tensors for :func:`train_linear_probe`; ``asked`` records each request."""

    def read(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if asked is not None:
            asked.append(list(idx))
        return emb[idx], labels[idx]

    return read, len(emb)


def test_cosine_logits_and_shape_checks():
    emb = F.normalize(torch.randn(2, D, 3, 5), dim=1)
    text = F.normalize(torch.randn(K, D), dim=1)
    logits = cosine_logits(2 * emb, 3 * text)  # scale-free: cosine
    torch.testing.assert_close(logits, 100 * torch.einsum("bdhw,kd->bkhw", emb, text))
    with pytest.raises(ValueError, match="same D"):
        cosine_logits(emb, torch.randn(K, D + 1))


def test_predict_language_recovers_the_class_map_at_label_size():
    emb, labels, directions = toy_split(0, noise=0.0)
    pred = predict_language(emb, directions, labels.shape[-2:])
    assert pred.dtype == torch.int64 and pred.shape == labels.shape
    valid = labels != 255
    assert torch.equal(pred[valid], labels[valid].long())


def test_recentring_from_the_students_centre_frees_a_held_out_class_from_the_known_cone():
    e = torch.eye(4)
    known, held = e[:2], e[2:3]
    centre = F.normalize(known.mean(0) + 0.5 * e[3], dim=0)  # where the student's embeddings sit: near, not on, the cone
    # A held-out pixel (CLIP sees e2) whose embedding was pulled towards that centre.
    emb = F.normalize(0.4 * e[2] + centre, dim=0).view(1, 4, 1, 1)
    named = torch.cat([known, held])
    assert cosine_logits(emb, named).argmax(1).item() == 0  # as trained: a known class wins
    assert language_logits(emb, named, centre=centre).argmax(1).item() == 2  # re-centred: the held-out one
    # The centre itself moves to the named classes' mean text, equidistant from all of them.
    at_centre = language_logits(centre.view(1, 4, 1, 1), named, centre=centre)
    torch.testing.assert_close(at_centre, torch.full_like(at_centre, at_centre[0, 0].item()))
    torch.testing.assert_close(language_logits(emb, named), cosine_logits(emb, named))


def test_language_logits_add_the_bias_per_class():
    emb, _, directions = toy_split(0)
    bias = torch.tensor([0.0, 5.0, 0.0, -1.0])
    torch.testing.assert_close(language_logits(emb, directions, bias=bias),
                               language_logits(emb, directions) + bias.view(1, -1, 1, 1))


def test_embedding_centre_is_the_mean_unit_embedding_over_strided_images():
    from clips4.inference import embedding_centre

    def embed(images: np.ndarray) -> torch.Tensor:
        """[red, 1] per pixel at stride 1: unit after normalising only when red is 0."""
        red = torch.from_numpy(np.asarray(images)[..., 0].astype(np.float32))[:, None]
        return torch.cat([red, torch.ones_like(red)], dim=1)

    images = np.zeros((10, 2, 2, 3), np.uint8)
    images[1::2, ..., 0] = 1  # odd images: every pixel [1, 1] -> [0.707, 0.707]
    half = 0.5**0.5
    torch.testing.assert_close(embedding_centre(embed, images), torch.tensor([half / 2, (1 + half) / 2]))
    torch.testing.assert_close(embedding_centre(embed, images, batch_size=3), embedding_centre(embed, images))
    # At most 5 images: every other one, all even (red 0); at most 4: images 0, 3, 6, 9, two of them odd.
    torch.testing.assert_close(embedding_centre(embed, images, max_images=5), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(embedding_centre(embed, images, max_images=4, batch_size=2), torch.tensor([half / 2, (1 + half) / 2]))
    with pytest.raises(ValueError, match="at least one image"):
        embedding_centre(embed, images[:0])


def test_upsampling_keeps_dropped_classes_out():
    scores = torch.randn(2, 3, 4, 4)
    scores[0, 1] = float("-inf")
    pred = upsample_argmax(scores, (9, 7))
    assert pred.shape == (2, 9, 7) and not (pred[0] == 1).any()


def test_resize_labels_is_nearest():
    labels = torch.arange(4, dtype=torch.uint8).reshape(1, 2, 2).repeat_interleave(4, 1).repeat_interleave(4, 2)
    small = resize_labels(labels, (2, 2))
    assert small.dtype == torch.uint8
    assert torch.equal(small, torch.arange(4, dtype=torch.uint8).reshape(1, 2, 2))


def test_language_scores_are_perfect_on_clean_toy_data():
    emb, labels, directions = toy_split(1, noise=0.05)
    batches = [(emb[:3], labels[:3]), (emb[3:], labels[3:])]
    scores, matrix = score_classifier(batches, partial(cosine_logits, weights=directions), K, CPU, held_out_ids=[3])
    assert scores["mIoU"] == pytest.approx(1.0) and scores["hIoU"] == pytest.approx(1.0)
    assert matrix.sum() == int((labels != 255).sum())


def test_unsupervised_segmentation_finds_the_toy_clusters():
    emb, labels, _ = toy_split(2, images=8)
    batches = [(emb[i : i + 2], labels[i : i + 2]) for i in range(0, 8, 2)]
    result = unsupervised_segmentation(batches, K, CPU, seed=0, sample_size=300, iterations=20)
    assert result.scores["mIoU"] > 0.95 and result.scores["pAcc"] > 0.95
    assert sorted(result.mapping.tolist()) == list(range(K)) and result.centroids.shape == (K, D)
    pred = result.predict(emb[:2], labels.shape[-2:])
    valid = labels[:2] != 255
    assert (pred[valid] == labels[:2][valid].long()).float().mean() > 0.95
    with pytest.raises(TypeError, match="generator"):
        unsupervised_segmentation(iter(batches), K, CPU)


def test_linear_probe_learns_a_separable_toy_problem():
    train_emb, train_labels, _ = toy_split(3, images=12, noise=0.2)
    probe = train_linear_probe(
        *reader(train_emb, resize_labels(train_labels, (8, 8))), K, epochs=15, lr=0.5, seed=0, device=CPU, batch_size=4
    )
    assert probe.weight.shape == (K, D, 1, 1)
    val_emb, val_labels, _ = toy_split(4, images=6, noise=0.2)
    scores, _ = score_classifier([(val_emb, val_labels)], probe, K, CPU)
    assert scores["mIoU"] > 0.95
    with pytest.raises(ValueError, match="resize_labels"):
        train_linear_probe(*reader(train_emb, train_labels), K, 1, 0.1, 0, CPU)


def test_probe_learns_on_standardised_channels_whatever_the_embedding_scale():
    """A spread of 1/1000 around an offset is the same problem for the probe: it standardises with the train
    split's moments, so the folded conv on the raw embeddings predicts the same classes."""
    train_emb, train_labels, _ = toy_split(3, images=12, noise=0.2)
    train_labels = resize_labels(train_labels, (8, 8))
    val_emb, val_labels, _ = toy_split(4, images=6, noise=0.2)
    squeezed = lambda x: 0.001 * x.float() + 0.5  # noqa: E731
    scores = []
    for transform in (lambda x: x.float(), squeezed):
        probe = train_linear_probe(*reader(transform(train_emb), train_labels), K, epochs=2, lr=0.2, seed=0,
                                   device=CPU, batch_size=4)
        scores.append(score_classifier([(transform(val_emb), val_labels)], probe, K, CPU)[0]["mIoU"])
    assert scores[0] > 0.95 and abs(scores[0] - scores[1]) < 1e-6


def _probe_in_memory(emb: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int,
                     batch_size: int) -> torch.nn.Conv2d:
    """The probe as it trains with the whole split in memory: moments over one tensor, batches indexed from it."""
    flat = emb.double().permute(1, 0, 2, 3).flatten(1)
    mean, std = flat.mean(1), flat.std(1, unbiased=False)
    mean, std = mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()
    probe = torch.nn.Conv2d(D, K, 1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-len(emb) // batch_size))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(emb), generator=generator).split(batch_size):
            x = (emb[idx].float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            loss = F.cross_entropy(probe(x), labels[idx].long(), ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        weight = probe.weight / std.view(1, -1, 1, 1)
        probe.bias -= (weight.flatten(1) * mean).sum(1)
        probe.weight.copy_(weight)
    return probe


def test_the_streamed_probe_matches_the_probe_trained_in_memory():
    """Same images per batch, same order, same moments: the two differ by float rounding only (the moments summed
    batch by batch rather than at once, a batch's images in ascending order), hence the 1e-5 tolerance."""
    emb, labels, _ = toy_split(6, images=11, noise=0.3)  # 11 images in batches of 4: a short last batch
    labels = resize_labels(labels, (8, 8))
    asked: list[list[int]] = []
    streamed = train_linear_probe(*reader(emb, labels, asked), K, epochs=3, lr=0.3, seed=7, device=CPU, batch_size=4)
    expected = _probe_in_memory(emb, labels, epochs=3, lr=0.3, seed=7, batch_size=4)
    torch.testing.assert_close(streamed.weight, expected.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.bias, expected.bias, rtol=1e-5, atol=1e-5)
    assert max(len(idx) for idx in asked) == 4  # never more than one batch in memory
    assert len(asked) == 3 + 3 * 3  # three batches in order for the moments, then three per epoch
    assert all(sorted(sum(asked[start : start + 3], [])) == list(range(11)) for start in range(0, len(asked), 3))
    assert not torch.equal(streamed.weight, _probe_in_memory(emb, labels, 3, 0.3, 8, 4).weight)  # seed orders


def test_channel_moments_over_all_pixels_in_chunks():
    emb = torch.randn(5, 3, 4, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    mean, std = channel_moments(emb.half().split(2), CPU)
    flat = emb.half().double().permute(1, 0, 2, 3).flatten(1)
    torch.testing.assert_close(mean, flat.mean(1).float())
    torch.testing.assert_close(std[:2], flat[:2].std(1, unbiased=False).float(), rtol=1e-4, atol=1e-5)
    assert std[2] == 1.0  # a constant channel keeps its (zero) standardised value instead of dividing by zero


def test_probe_skips_batches_with_only_ignored_pixels():
    emb, labels, _ = toy_split(5, images=2)
    labels = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    probe = train_linear_probe(*reader(emb, labels), K, epochs=1, lr=0.1, seed=0, device=CPU)
    assert np.allclose(probe.weight.detach().numpy(), 0)


def test_multiscale_embedding_averages_unit_maps_on_the_first_scales_grid():
    from clips4.inference import embed_multiscale

    def embed(images: np.ndarray) -> torch.Tensor:
        """A stand-in encoder at output stride 2 whose embedding is [mean red, side / 100, 1]: scale-dependent."""
        side = images.shape[1]
        red = torch.from_numpy(images[..., 0].astype(np.float32) / 255)[:, None, ::2, ::2]
        return torch.cat([red, torch.full_like(red, side / 100), torch.ones_like(red)], dim=1)

    images = [np.full((8, 8, 3), 255, np.uint8), np.zeros((12, 12, 3), np.uint8)]
    one = embed_multiscale(embed, images, 8, [1.0])
    assert torch.allclose(one, F.normalize(embed(np.stack([np.full((8, 8, 3), 255, np.uint8)] + [np.zeros((8, 8, 3), np.uint8)])), dim=1))
    two = embed_multiscale(embed, images, 8, [1.0, 2.0])
    assert two.shape == (2, 3, 4, 4)  # the first scale's grid, although the second embeds 16 px images
    expected = F.normalize(F.normalize(torch.tensor([1.0, 0.08, 1.0]), dim=0) + F.normalize(torch.tensor([1.0, 0.16, 1.0]), dim=0), dim=0)
    assert torch.allclose(two[0, :, 0, 0], expected, atol=1e-6)
    assert torch.allclose(two.norm(dim=1), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="test scales must lie in"):
        embed_multiscale(embed, images, 8, [1.0, 5.0])
    with pytest.raises(ValueError, match="at least one test scale"):
        embed_multiscale(embed, images, 8, [])


def test_array_embedder_reads_runs_and_scattered_indices_alike() -> None:
    stored = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)  # [N,h,w,D]
    embed = array_embedder(stored)
    assert embed([1, 2, 3]).shape == (3, 4, 2, 3)
    torch.testing.assert_close(embed([0, 2, 4]), torch.from_numpy(stored[[0, 2, 4]]).permute(0, 3, 1, 2))
    torch.testing.assert_close(embed([3]), torch.from_numpy(stored[3:4]).permute(0, 3, 1, 2))
