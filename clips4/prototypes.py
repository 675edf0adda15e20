"""Unknown prototypes (METHOD.md §4): spherical k-means in which the K known-class text embeddings are fixed centres.

The known classes are already named by their text embeddings, so those centres never move; the M free centres learn
what the CLIP features hold that no known class explains. CLIP's image and text embeddings sit in two separate cones
(the "modality gap", Liang et al., NeurIPS 2022), so raw image features are nearly always nearer a free centre
fitted to them than to any text: the text centres would get no points and the prototypes would not be comparable
with the class texts. Clustering runs on image features moved across the gap (:func:`close_gap`), which puts free
and fixed centres on one scale. Assignment is a FAISS flat inner-product search (on the GPU
when faiss has GPU support), the update is the re-normalised mean, so 100k x 512 samples cluster in seconds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)

# k-means++ seeding looks at this many sample points per centre (enough to hit every well-populated mode).
SEED_POOL_PER_CENTRE = 64
UNIT_TOLERANCE = 1e-4  # rows whose norm is this close to 1 are used as they are


@dataclass
class KMeansResult:
    """``centroids`` hold the fixed centres first, then the free ones; ``inertia`` = sum over points of 1 - <x, c>."""

    centroids: np.ndarray  # float32 [K + k, D], unit rows
    assignment: np.ndarray  # int64 [N], index into centroids
    sizes: np.ndarray  # int64 [K + k], points per centre
    inertia: float


class NearestCentre:
    """Max-inner-product assignment of points to centres with a FAISS flat index, on the GPU when faiss can."""

    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if use_gpu and not gpu_ok:
            raise RuntimeError(
                "GPU clustering was asked for but this faiss has no GPU support or sees no GPU; "
                "install faiss-gpu, or set cluster.device to 'auto' or 'cpu'"
            )
        self.on_gpu = gpu_ok and use_gpu is not False
        self.index = faiss.IndexFlatIP(dim)
        if self.on_gpu:
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.resources, 0, self.index)

    def __call__(self, x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity to the nearest centre [N] float32, its index [N] int64)."""
        self.index.reset()
        self.index.add(centres)
        sim, idx = self.index.search(x, 1)
        return sim[:, 0], idx[:, 0]


def unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """float32, C-contiguous, L2-normalised rows; refuses NaN/inf and all-zero rows, which have no direction.

    Rows that are already unit length (stored features are) come back as they are, sparing a copy of a sample that
    can be hundreds of megabytes.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # NaN or inf in a row makes its norm non-finite
    if not np.isfinite(norms).all():
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values; check the features it was built from")
        norms = np.linalg.norm(x.astype(np.float64), axis=1)  # finite values whose squares overflow float32
    if (norms == 0).any():
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero rows, which cannot be clustered on the sphere")
    if np.abs(norms - 1.0).max(initial=0.0) < UNIT_TOLERANCE:
        return x
    return (x / norms[:, None]).astype(np.float32, copy=False)


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    iterations: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 100_000,
    fixed: np.ndarray | None = None,
    init: np.ndarray | None = None,
    use_gpu: bool | None = None,
) -> KMeansResult:
    """Spherical k-means of unit rows ``x`` with ``k`` free centres and optional ``fixed`` centres that never move.

    Free centres start at ``init`` when given (e.g. the previous prototypes), else k-means++ seeding away from the
    fixed centres. More than ``(K + k) * max_points_per_centroid`` points are subsampled with ``seed`` for the
    iterations (logged); every point of ``x`` is assigned to the final centres. Free centres that lose all their
    points restart at the points farthest from their centres. Stops early once the assignment no longer changes.
    """
    x = unit_rows(x, "x")
    n, dim = x.shape
    fixed = np.zeros((0, dim), np.float32) if fixed is None else unit_rows(fixed, "fixed centres")
    if fixed.shape[1] != dim:
        raise ValueError(f"fixed centres have dim {fixed.shape[1]} but the points have dim {dim}")
    if k < 0 or k + len(fixed) < 1:
        raise ValueError(f"need at least one centre: got k={k} free and {len(fixed)} fixed")
    if n < k:
        raise ValueError(f"cannot place {k} free centres on {n} points; sample more features or lower the count")
    if iterations < 1 or max_points_per_centroid < 1:
        raise ValueError("iterations and max_points_per_centroid must be at least 1")
    rng = np.random.default_rng(seed)
    train = subsample(x, (len(fixed) + k) * max_points_per_centroid, rng, seed)
    if init is not None:
        free = unit_rows(init, "init centres")
        if free.shape != (k, dim):
            raise ValueError(f"init centres must have shape {(k, dim)}, got {free.shape}")
    else:
        free = kmeans_pp_seeds(train, fixed, k, rng)
    nearest = NearestCentre(dim, use_gpu)
    previous = None
    converged = False
    for _ in range(iterations):
        sim, assignment = nearest(train, np.concatenate([fixed, free]))
        if previous is not None and np.array_equal(assignment, previous):
            converged = True
            break
        previous = assignment
        free = update_free_centres(train, sim, assignment, len(fixed), free)
    centroids = np.concatenate([fixed, free])
    if not (converged and train is x):  # else the last search already assigned every point to these centres
        sim, assignment = nearest(x, centroids)
    return KMeansResult(
        centroids=centroids,
        assignment=assignment.astype(np.int64),
        sizes=np.bincount(assignment, minlength=len(centroids)).astype(np.int64),
        inertia=float(np.sum(1.0 - sim, dtype=np.float64)),
    )


def subsample(x: np.ndarray, cap: int, rng: np.random.Generator, seed: int) -> np.ndarray:
    """At most ``cap`` rows of ``x``, drawn with ``rng``; says so in the log when it drops any."""
    if len(x) <= cap:
        return x
    logger.warning(
        "spherical k-means: %d points exceed centres x max_points_per_centroid = %d; iterating on a random "
        "subsample of %d (seed %d) and assigning all %d points at the end",
        len(x), cap, cap, seed, len(x),
    )
    return x[np.sort(rng.choice(len(x), size=cap, replace=False))]


def kmeans_pp_seeds(x: np.ndarray, fixed: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding on a random pool of ``x``, with the fixed centres counted as already chosen.

    Squared chord distance on the sphere is 2(1 - cos), so candidates are drawn with probability proportional to
    1 - (best cosine to any chosen centre), and of 2 + log(K + k) candidates the one that lowers the total distance
    most is kept: free centres land where the known classes do not reach.
    """
    pool = x[rng.choice(len(x), size=min(len(x), SEED_POOL_PER_CENTRE * (len(fixed) + k)), replace=False)]
    best = (pool @ fixed.T).max(axis=1) if len(fixed) else np.full(len(pool), -1.0, np.float32)
    trials = 2 + int(np.log(len(fixed) + k))
    seeds = np.empty((k, x.shape[1]), np.float32)
    for j in range(k):
        weight = np.clip(1.0 - best.astype(np.float64), 0.0, None)
        total = weight.sum()
        picks = rng.choice(len(pool), size=trials, p=weight / total) if total > 0 else rng.integers(len(pool), size=1)
        covered = np.maximum(best[:, None], pool @ pool[picks].T)
        choice = int(np.argmin((1.0 - covered).sum(axis=0)))
        seeds[j] = pool[picks[choice]]
        best = covered[:, choice]
    return seeds


def update_free_centres(
    x: np.ndarray, sim: np.ndarray, assignment: np.ndarray, num_fixed: int, free: np.ndarray
) -> np.ndarray:
    """New free centres: normalised mean of their points; empty ones move to the worst-served points."""
    k, dim = free.shape
    if k == 0:
        return free
    # Fixed centres go to a scratch row k; torch's index_add_ runs on every core where a sparse product runs on one.
    rows = torch.from_numpy(np.where(assignment >= num_fixed, assignment - num_fixed, k))
    with warnings.catch_warnings():  # x may be a read-only view of stored features; it is only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        points = torch.from_numpy(x)
    sums = torch.zeros(k + 1, dim).index_add_(0, rows, points)[:k].numpy()
    counts = np.bincount(rows.numpy(), minlength=k + 1)[:k]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        sums[empty] = x[np.argsort(sim, kind="stable")[: len(empty)]]
        logger.info("spherical k-means: re-seeded %d empty free centres at the farthest points", len(empty))
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def modality_gap(image_features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """mean(text rows) - mean(image rows), float32 [D]: the offset from CLIP's image cone to its text cone."""
    image_features, text = unit_rows(image_features, "image features"), unit_rows(text, "text embeddings")
    if image_features.shape[1] != text.shape[1]:
        raise ValueError(f"image features have dim {image_features.shape[1]} but text embeddings {text.shape[1]}")
    return (text.mean(axis=0) - image_features.mean(axis=0)).astype(np.float32)


def close_gap(x: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Image embeddings [N, D] moved by ``gap`` and re-normalised, so that they compare with text embeddings."""
    return unit_rows(unit_rows(x, "image features") + gap, "gap-corrected image features")


def unknown_prototypes(
    features_sample: np.ndarray,
    known_text: np.ndarray,
    num_unknown: int,
    iterations: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 100_000,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prototypes [M, D], points per known class [K], points per prototype [M]) from sampled CLIP features."""
    result = spherical_kmeans(features_sample, num_unknown, iterations, seed, max_points_per_centroid,
                              fixed=known_text, use_gpu=use_gpu)
    num_known = len(known_text)
    return result.centroids[num_known:], result.sizes[:num_known], result.sizes[num_known:]
