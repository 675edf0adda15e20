import logging
from dataclasses import replace

import faiss
import numpy as np
import torch
import pytest

from clips4.prototypes import (
    LabelRule,
    modality_gap,
    move_across_gap,
    named_clusters,
    spherical_kmeans,
    unit_rows,
    unknown_prototypes,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def blob_data(num_blobs: int, per_blob: int, dim: int = 16, spread: float = 0.15, seed: int = 0):
    """Unit vectors around ``num_blobs`` random directions; returns (points, labels, blob means)."""
    rng = np.random.default_rng(seed)
    means = unit(rng.standard_normal((num_blobs, dim)))
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = unit(means[labels] + spread * rng.standard_normal((len(labels), dim)))
    return points, labels, means


def test_fixed_centres_never_move():
    x, _, _ = blob_data(5, 40)
    fixed = unit(np.random.default_rng(1).standard_normal((3, 16)))
    result = spherical_kmeans(x, k=4, iterations=10, seed=0, fixed=fixed)
    assert result.centroids.shape == (7, 16)
    np.testing.assert_allclose(result.centroids[:3], fixed, atol=1e-6)
    one_step = spherical_kmeans(x, k=4, iterations=1, seed=0, fixed=fixed)
    np.testing.assert_array_equal(one_step.centroids[:3], result.centroids[:3])
    assert not np.array_equal(one_step.centroids[3:], result.centroids[3:])  # while the free ones did move
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert result.sizes.sum() == len(x) and result.assignment.shape == (len(x),)


def test_free_centres_find_the_unknown_blobs():
    x, labels, means = blob_data(6, 60)
    known, unknown = means[:4], means[4:]
    result = spherical_kmeans(x, k=2, iterations=20, seed=0, fixed=known)
    free = result.centroids[4:]
    # each unknown blob has its own free centre, close to the blob's direction
    best = (unknown @ free.T).argmax(axis=1)
    assert sorted(best.tolist()) == [0, 1]
    assert (unknown @ free.T).max(axis=1).min() > 0.95
    # known blobs go to their fixed text centre, unknown blobs to the free centres
    np.testing.assert_array_equal(result.assignment[labels < 4], labels[labels < 4])
    assert (result.assignment[labels >= 4] >= 4).all()


@pytest.mark.parametrize("iterations", [1, 50])  # stopped by the limit / converged (its last search is reused)
def test_the_result_describes_its_own_centres(iterations):
    x, _, means = blob_data(6, 50, spread=0.4)
    result = spherical_kmeans(x, k=3, iterations=iterations, seed=0, fixed=means[:2])
    similarity = x @ result.centroids.T
    np.testing.assert_array_equal(result.assignment, similarity.argmax(axis=1))
    np.testing.assert_array_equal(result.sizes, np.bincount(result.assignment, minlength=5))
    assert result.inertia == pytest.approx(float((1.0 - similarity.max(axis=1)).sum()), rel=1e-4)


def test_closing_the_modality_gap_lets_text_centres_win_their_blobs():
    """Image blobs displaced from their class texts by one common offset (CLIP's modality gap): raw, the free
    centres take every blob; moved across the gap, known blobs go to their texts and unknown ones to free centres."""
    x, labels, means = blob_data(6, 60, dim=32, spread=0.1, seed=4)
    offset = unit(np.random.default_rng(9).standard_normal(32))
    images = unit(x + offset)
    text = means[:4]
    raw = spherical_kmeans(images, k=2, iterations=20, seed=0, fixed=text)
    assert raw.sizes[:4].sum() < len(x) / 10  # text centres starve
    gap = modality_gap(images, text)
    np.testing.assert_allclose(gap, text.mean(0) - images.mean(0), atol=1e-6)
    moved = move_across_gap(torch.from_numpy(images), torch.from_numpy(gap)).numpy()
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-5)
    fixed = spherical_kmeans(moved, k=2, iterations=20, seed=0, fixed=text)
    # the shift is one vector for all classes and the sphere bends it, so the correction is close, not exact
    assert (fixed.assignment[labels < 4] == labels[labels < 4]).mean() > 0.9
    assert (fixed.assignment[labels >= 4] >= 4).mean() > 0.9
    with pytest.raises(ValueError, match="dim"):
        modality_gap(images, text[:, :16])


def test_without_fixed_centres_recovers_blobs():
    x, labels, _ = blob_data(4, 50)
    result = spherical_kmeans(x, k=4, iterations=20, seed=3)
    # a perfect partition: every blob maps to exactly one cluster
    pairs = {(int(a), int(b)) for a, b in zip(labels, result.assignment)}
    assert len(pairs) == 4 and len({b for _, b in pairs}) == 4
    assert result.inertia == pytest.approx(float((1 - (x * result.centroids[result.assignment]).sum(1)).sum()),
                                           rel=1e-4)


def test_subsampling_is_logged_and_deterministic(caplog):
    x, _, _ = blob_data(3, 200)
    with caplog.at_level(logging.WARNING, logger="clips4.prototypes"):
        a = spherical_kmeans(x, k=3, iterations=5, seed=7, max_points_per_centroid=50)
    assert any("subsample of 150" in r.getMessage() and "seed 7" in r.getMessage() for r in caplog.records)
    b = spherical_kmeans(x, k=3, iterations=5, seed=7, max_points_per_centroid=50)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.assignment.shape == (600,)  # every point is assigned, not only the subsample
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clips4.prototypes"):
        spherical_kmeans(x, k=3, iterations=5, seed=7, max_points_per_centroid=200)
    assert not caplog.records


def test_init_is_used_and_empty_centres_are_reseeded():
    x, _, means = blob_data(3, 50)
    far = unit(-means.sum(0, keepdims=True))  # a start no point is nearest to
    result = spherical_kmeans(x, k=3, iterations=10, seed=0, init=np.concatenate([means[:2], far]))
    assert (result.sizes > 0).all()
    assert (means @ result.centroids.T).max(axis=1).min() > 0.95
    with pytest.raises(ValueError, match="init centres must have shape"):
        spherical_kmeans(x, k=3, init=means[:2])


def test_unknown_prototypes_wrapper_and_no_unknowns():
    x, _, means = blob_data(5, 30)
    protos, sizes_known, sizes_unknown = unknown_prototypes(x, means[:3], num_unknown=2, iterations=10, seed=0)
    assert protos.shape == (2, 16) and sizes_known.shape == (3,) and sizes_unknown.shape == (2,)
    assert sizes_known.sum() + sizes_unknown.sum() == len(x)
    protos, sizes_known, sizes_unknown = unknown_prototypes(x, means[:3], num_unknown=0)
    assert protos.shape == (0, 16) and sizes_unknown.shape == (0,) and sizes_known.sum() == len(x)


def test_prototypes_fit_only_what_no_known_class_explains():
    """Known-class features lie far from their text (cosine 0.6) yet CLIP names them surely; fitted on every feature,
    the one free centre takes them, fitted on the rest it finds the unexplained blob, and the counts follow the rule."""
    rng = np.random.default_rng(0)
    texts = np.eye(8, dtype=np.float32)[:2]
    explained = unit(np.array([0.6, 0, 0.8, 0, 0, 0, 0, 0]) + 0.05 * rng.standard_normal((300, 8)))
    noise = 0.05 * rng.standard_normal((100, 8)) * (np.arange(8) >= 2)  # alike to both texts: CLIP cannot choose
    blob = unit(np.array([0.3, 0.3, 0, 0, 0, 1.0, 0, 0]))
    unexplained = unit(blob + noise)
    x = np.concatenate([explained, unexplained]).astype(np.float32)
    rule = LabelRule("known_first", known_scale=100.0, known_confidence=0.9, fit_on="unexplained")
    np.testing.assert_array_equal(rule.fit_rows(x, texts), np.arange(300, 400))
    protos, known, unknown = unknown_prototypes(x, texts, 1, iterations=10, rule=rule)
    assert protos[0] @ blob > 0.99
    assert known.tolist() == [300, 0] and unknown.tolist() == [100]
    # the floor at the 0.25 quantile of the cosines to the nearest text lies between the two groups' (0.28, 0.6)
    floored = rule.with_floor(x, texts, 0.25)
    assert 0.28 < floored.known_floor < 0.6 and rule.with_floor(x, texts, 0.0) == rule
    np.testing.assert_array_equal(floored.fit_rows(x, texts), np.arange(300, 400))
    higher = LabelRule("known_first", known_scale=100.0, known_confidence=0.9, fit_on="unexplained", known_floor=0.9)
    assert len(higher.fit_rows(x, texts)) == 400 and unknown_prototypes(x, texts, 1, rule=higher)[1].sum() == 0
    everything = LabelRule("known_first", known_scale=100.0, known_confidence=0.9, fit_on="all")
    assert unknown_prototypes(x, texts, 1, iterations=10, rule=everything)[0][0] @ blob < 0.9
    nearest, known, unknown = unknown_prototypes(x, texts, 1, iterations=10)  # docs/method.md §4 as written
    assert known.sum() + unknown.sum() == 400 and known.sum() < 300


def test_clip_names_clusters_not_pixels():
    """Two known things and one unnamed thing that CLIP's softmax gives, feature by feature, to either known class
    (a third of its features surely to each): the clusters of the known things are named and become anchors, the
    unnamed thing's cluster stays a prototype, and every feature near it takes that prototype, not a known class."""
    rng = np.random.default_rng(0)
    texts = np.eye(8, dtype=np.float32)[:2]
    first = unit(np.array([1.0, 0, 0, 1.0, 0, 0, 0, 0]) + 0.05 * rng.standard_normal((200, 8)))
    second = unit(np.array([0, 1.0, 0, 0, 1.0, 0, 0, 0]) + 0.05 * rng.standard_normal((200, 8)))
    lean = np.repeat(np.array([[0.12, 0], [0, 0.12], [0, 0]]), [40, 40, 40], axis=0)  # surely first, second, unsure
    unnamed = unit(np.concatenate([lean, np.tile([[0, 0, 0, 0, 0, 1.0]], (120, 1))], axis=1)
                   + 0.01 * rng.standard_normal((120, 8)))
    x = np.concatenate([first, second, unnamed]).astype(np.float32)
    rule = LabelRule("named_clusters", known_scale=100.0, known_confidence=0.9, name_share=0.5)
    zero_shot = rule.zero_shot(torch.from_numpy(unnamed), torch.from_numpy(texts))
    assert (zero_shot[:80] >= 0).all()  # CLIP is sure, and wrong, on two thirds of the unnamed thing's features
    found = named_clusters(x, texts, 3, rule, iterations=10)
    assert sorted(found.anchor_class.tolist()) == [0, 1] and len(found.prototypes) == 1
    assert found.prototypes[0] @ np.eye(8, dtype=np.float32)[7] > 0.95
    assert found.known_sizes.tolist() == [200, 200] and found.unknown_sizes.tolist() == [120]
    labelled = rule.with_anchors(found.anchors, found.anchor_class)
    targets = torch.from_numpy(np.concatenate([texts, found.prototypes]))
    labels = labelled.label(torch.from_numpy(x), targets, 2)
    assert labels[:200].eq(0).all() and labels[200:400].eq(1).all() and labels[400:].eq(2).all()
    # the same features labelled pixel by pixel by CLIP's softmax give two thirds of the unnamed thing a known class
    pixelwise = LabelRule("known_first", known_scale=100.0, known_confidence=0.9).label(torch.from_numpy(x), targets, 2)
    assert pixelwise[400:].lt(2).float().mean() > 0.6
    lax = named_clusters(x, texts, 3, replace(rule, name_share=0.3), iterations=10)
    assert len(lax.anchors) == 3 and len(lax.prototypes) == 0  # a third of the votes names the unnamed thing too
    with pytest.raises(ValueError, match="needs the cluster stage's anchors"):
        rule.label(torch.from_numpy(x), targets, 2)


def test_bad_input_is_refused():
    x, _, _ = blob_data(2, 5)
    with pytest.raises(ValueError, match="cannot place 20 free centres"):
        spherical_kmeans(x, k=20)
    with pytest.raises(ValueError, match="all-zero rows"):
        spherical_kmeans(np.zeros((4, 16), np.float32), k=1)
    with pytest.raises(ValueError, match="fixed centres have dim"):
        spherical_kmeans(x, k=1, fixed=np.ones((2, 8), np.float32))


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="only meaningful where faiss has no GPU")
def test_gpu_request_without_gpu_faiss_is_a_clear_error():
    x, _, _ = blob_data(2, 5)
    with pytest.raises(RuntimeError, match=r"no GPU support or sees no GPU; install 'clips4\[gpu\]'"):
        spherical_kmeans(x, k=2, use_gpu=True)


def test_unit_rows_reuses_unit_input_and_normalises_the_rest():
    unit = np.eye(3, dtype=np.float32)
    assert unit_rows(unit, "x") is unit  # no copy of already-normalised features
    huge = np.array([[3e20, 4e20], [0.0, 2.0]], np.float32)  # squares overflow float32 but the rows are fine
    np.testing.assert_allclose(unit_rows(huge, "x"), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="x contains NaN"):
        unit_rows(np.array([[np.inf, 1.0]], np.float32), "x")


def lloyd(x: np.ndarray, fixed: np.ndarray, free: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain spherical Lloyd iterations, every point searched each time: the reference the bounds must match."""
    previous = None
    for _ in range(iterations):
        assignment = (x @ np.concatenate([fixed, free]).T).argmax(axis=1)
        if previous is not None and np.array_equal(assignment, previous):
            break
        previous = assignment
        sums = np.stack([x[assignment == len(fixed) + j].sum(0) for j in range(len(free))])
        free = unit(sums)
    return np.concatenate([fixed, free]), assignment


@pytest.mark.parametrize("spread", [0.3, 0.8])  # separated blobs (most points skipped) / heavy overlap (many move)
def test_skipping_points_the_bounds_settle_gives_lloyds_result(spread):
    x, _, means = blob_data(8, 300, dim=24, spread=spread, seed=5)
    init = unit(means[2:] + 0.5 * np.random.default_rng(2).standard_normal((6, 24)))
    result = spherical_kmeans(x, k=6, iterations=40, seed=0, fixed=means[:2], init=init)
    centroids, assignment = lloyd(x, means[:2], init, 40)
    np.testing.assert_array_equal(result.assignment, assignment)
    np.testing.assert_allclose(result.centroids, centroids, atol=1e-5)
