"""Unknown prototypes (docs/method.md §4): spherical k-means in which the K known-class text embeddings are fixed centres.

The known classes are already named by their text embeddings, so those centres never move; the M free centres learn
what the CLIP features hold that no known class explains. CLIP's image and text embeddings sit in two separate cones
(the "modality gap", Liang et al., NeurIPS 2022), so raw image features are nearly always nearer a free centre
fitted to them than to any text: the text centres would get no points and the prototypes would not be comparable
with the class texts. Clustering runs on image features moved across the gap (:func:`move_across_gap`), which puts free
and fixed centres on one scale. Assignment is a FAISS flat inner-product search (on the GPU
when faiss has GPU support), the update is the re-normalised mean, and after the first iterations only the points
whose similarity bounds no longer prove their centre are searched again (:class:`AssignmentBounds`), so 100k x 512
samples cluster in well under a second.

Which target labels a segment for L_sem is :class:`LabelRule`'s: texts and prototypes are not alike (a prototype is
a mean of image features, a text is not), so by default a segment takes a known class when CLIP's own zero-shot
softmax over the known texts is confident, and the nearest prototype otherwise; the prototypes are fitted only on
the features that rule leaves to them (docs/method.md §4).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from clips4.losses import known_confidence, semantic_labels

logger = logging.getLogger(__name__)

# k-means++ seeding looks at this many sample points per centre (enough to hit every well-populated mode).
SEED_POOL_PER_CENTRE = 64
UNIT_TOLERANCE = 1e-4  # rows whose norm is this close to 1 are used as they are
MOVER_SHIFT = 0.01  # centres that moved farther than this are compared with every point exactly
BOUND_MARGIN = 1e-5  # similarity bounds closer than this are searched again (float32 rounding is ~1e-7 per term)


@dataclass
class KMeansResult:
    """``centroids`` hold the fixed centres first, then the free ones; ``inertia`` = sum over points of 1 - <x, c>."""

    centroids: np.ndarray  # float32 [K + k, D], unit rows
    assignment: np.ndarray  # int64 [N], index into centroids
    sizes: np.ndarray  # int64 [K + k], points per centre
    inertia: float


INSTALL_FAISS = "pip install 'clips4[cpu]' (or 'clips4[gpu]' for faiss-gpu; install one, never both)"


def load_faiss():
    """The faiss module, or one error saying how to install it: clips4 leaves the choice of CPU or GPU build to the
    user, since both builds install the same module and cannot sit side by side."""
    try:
        import faiss
    except ImportError:
        raise RuntimeError(f"faiss is not installed: {INSTALL_FAISS}") from None
    return faiss


class NearestCentre:
    """Max-inner-product assignment of points to centres with a FAISS flat index, on the GPU when faiss can."""

    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        faiss = load_faiss()
        gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if use_gpu and not gpu_ok:
            raise RuntimeError(
                "GPU clustering was asked for but this faiss has no GPU support or sees no GPU; "
                "install 'clips4[gpu]' in place of 'clips4[cpu]', or set cluster.device to 'auto' or 'cpu'"
            )
        self.on_gpu = gpu_ok and use_gpu is not False
        self.index = faiss.IndexFlatIP(dim)
        if self.on_gpu:
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.resources, 0, self.index)

    def __call__(self, x: np.ndarray, centres: np.ndarray, neighbours: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(similarities to the nearest ``neighbours`` centres [N, n] float32, best first; their indices [N, n])."""
        self.index.reset()
        self.index.add(centres)
        return self.index.search(x, neighbours)


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
    centres = np.concatenate([fixed, free])
    nearest = NearestCentre(dim, use_gpu)
    bounds = AssignmentBounds(train, len(fixed), len(centres))
    converged = False
    for step in range(iterations):
        moved = bounds.reassign(nearest, centres, bounds.candidates() if step else None)
        if step and moved == 0:
            converged = True  # no point moved: the centres are a fixed point of the update
            break
        moved_to = np.concatenate([fixed, bounds.free_centres()])
        bounds.centres_moved(moved_to, centres)
        centres = moved_to
    if converged and train is x:  # the bounds prove the last assignment exact for every point
        assignment, inertia = bounds.assignment, bounds.inertia(centres)
    else:
        sim, assignment = nearest(x, centres)
        sim, assignment = sim[:, 0], assignment[:, 0]
        inertia = float(np.sum(1.0 - sim, dtype=np.float64))
    return KMeansResult(
        centroids=centres,
        assignment=assignment.astype(np.int64),
        sizes=np.bincount(assignment, minlength=len(centres)).astype(np.int64),
        inertia=inertia,
    )


class AssignmentBounds:
    """Lloyd's k-means state with Hamerly-style bounds, so that an iteration searches only points that may move.

    For unit vectors, moving a centre by ``d`` (Euclidean) changes its inner product with any unit point by at most
    ``d``. Each point keeps a lower bound on its similarity to its own centre and an upper bound on its similarity to
    every other one; while the first exceeds the second its assignment cannot change, so it is not searched. After
    the first iterations the centres barely move and most points are skipped; the result is Lloyd's all the same.
    Centre sums change only by the points that moved.
    """

    def __init__(self, x: np.ndarray, num_fixed: int, num_centres: int) -> None:
        with warnings.catch_warnings():  # x may be a read-only view of stored features; it is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.points = torch.from_numpy(x)
        self.x, self.num_fixed = x, num_fixed
        self.assignment = np.full(len(x), -1, np.int64)
        self.own = np.full(len(x), -np.inf, np.float32)  # <= similarity to the assigned centre
        self.other = np.full(len(x), np.inf, np.float32)  # >= similarity to every other centre
        # torch's index_add_ runs on every core where a sparse product runs on one
        self.sums = torch.zeros(num_centres, x.shape[1])
        self.counts = np.zeros(num_centres, np.int64)

    def candidates(self) -> np.ndarray:
        """Points whose bounds no longer prove their assignment (a margin covers float32 rounding)."""
        return np.flatnonzero(self.own <= self.other + BOUND_MARGIN)

    def reassign(self, nearest: NearestCentre, centres: np.ndarray, rows: np.ndarray | None) -> int:
        """Search ``rows`` (None: every point) exactly for their top two centres; returns how many changed centre."""
        if rows is None or len(rows) > len(self.x) // 2:  # then all of them, in place rather than copied
            rows, points = np.arange(len(self.x)), self.x
        elif len(rows) == 0:
            return 0
        else:
            points = self.x[rows]
        sim, idx = nearest(points, centres, 2)
        best = idx[:, 0]
        changed = best != self.assignment[rows]
        moved, after = rows[changed], best[changed]
        before = self.assignment[moved]
        if (before >= 0).all():  # every point has a centre after the first search
            self.sums.index_add_(0, torch.from_numpy(before), self.points[torch.from_numpy(moved)], alpha=-1.0)
            self.counts -= np.bincount(before, minlength=len(self.counts))
        self.sums.index_add_(0, torch.from_numpy(after),
                             self.points if len(moved) == len(self.x) else self.points[torch.from_numpy(moved)])
        self.counts += np.bincount(after, minlength=len(self.counts))
        self.assignment[rows] = best
        self.own[rows] = sim[:, 0]
        self.other[rows] = sim[:, 1]  # FAISS fills a missing second neighbour (one centre) with -FLT_MAX
        return len(moved)

    def free_centres(self) -> np.ndarray:
        """New free centres: normalised mean of their points; empty ones move to the worst-served points."""
        sums = self.sums[self.num_fixed:].numpy().copy()
        empty = np.flatnonzero(self.counts[self.num_fixed:] == 0)
        if len(empty):
            sums[empty] = self.x[np.argsort(self.own, kind="stable")[: len(empty)]]
            logger.info("spherical k-means: re-seeded %d empty free centres at the farthest points", len(empty))
        return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32, copy=False)

    def centres_moved(self, new: np.ndarray, old: np.ndarray) -> None:
        """Loosen every point's bounds by how far the centres moved.

        A centre or two that still travel far (one of two seeds in one blob, say) would loosen every point's bound
        on "any other centre" at once. Up to a quarter of the centres, the farthest-moved, are then compared with
        every point exactly instead: one pass over the points, paid only when it spares most of them a search.
        """
        shift = np.linalg.norm(new - old, axis=1)
        movers = np.argsort(shift)[::-1][: min(len(shift) // 4, int((shift > MOVER_SHIFT).sum()))]
        still = shift.copy()
        still[movers] = 0.0
        self.own -= shift[self.assignment]
        other = self.other + largest_other(still, self.assignment)
        if len(movers) and np.mean(self.own > other + BOUND_MARGIN) > 0.5:
            sim = (self.points @ torch.from_numpy(new[movers]).T).numpy()  # [N, movers]
            column = np.full(len(shift), -1)
            column[movers] = np.arange(len(movers))
            own = column[self.assignment]
            at_mover = np.flatnonzero(own >= 0)
            self.own[at_mover] = sim[at_mover, own[at_mover]]  # exact where the own centre is a mover
            sim[at_mover, own[at_mover]] = -np.inf
            self.other = np.maximum(other, sim.max(axis=1))
        elif len(movers):  # not worth the pass: the movers loosen the bounds like any other centre
            self.other += largest_other(shift, self.assignment)
        else:
            self.other = other

    def inertia(self, centres: np.ndarray) -> float:
        """sum over points of 1 - <x, own centre>, from the centre sums: N - sum_c <sum_c, c>."""
        return float(len(self.x) - np.einsum("ij,ij->", self.sums.numpy().astype(np.float64), centres))


def largest_other(shift: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Per point, the largest ``shift`` among the centres it is not assigned to (0 with a single centre)."""
    if len(shift) < 2:
        return np.zeros(len(assignment), np.float32)
    first, second = np.argsort(shift)[::-1][:2]
    return np.where(assignment == first, shift[second], shift[first]).astype(np.float32)


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


def modality_gap(image_features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """mean(text rows) - mean(image rows), float32 [D]: the offset from CLIP's image cone to its text cone."""
    image_features, text = unit_rows(image_features, "image features"), unit_rows(text, "text embeddings")
    if image_features.shape[1] != text.shape[1]:
        raise ValueError(f"image features have dim {image_features.shape[1]} but text embeddings {text.shape[1]}")
    return (text.mean(axis=0) - image_features.mean(axis=0)).astype(np.float32)


def move_across_gap(x: torch.Tensor, gap: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """CLIP image embeddings ``x`` moved by the modality-gap offset ``gap`` [D] along ``dim`` and re-normalised, so
    that they compare with text embeddings: the one definition of the move, for clustering, training and scoring."""
    shape = [1] * x.ndim
    shape[dim] = -1
    return F.normalize(F.normalize(x, dim=dim) + gap.to(x).view(shape), dim=dim)


@dataclass(frozen=True)
class LabelRule:
    """How L_sem labels a CLIP segment embedding over known texts + prototypes, and which features the prototypes
    are fitted on (``cluster.labels``, ``known_scale``, ``known_confidence``, ``fit_on``; docs/method.md §4).
    The default is docs/method.md §4 as written: the nearest target, prototypes fitted on every feature.

    ``named_clusters`` labels on the image side: ``anchors`` are the cluster centres CLIP names as a known class
    (``anchor_class``), the prototypes the unnamed ones; a segment takes the name of its nearest centre."""

    labels: str = "nearest"
    known_scale: float = 100.0
    known_confidence: float = 0.5
    fit_on: str = "all"
    known_floor: float = -1.0  # cosine to the named class's text below which a segment is left to the prototypes
    name_share: float = 0.5  # named_clusters: share of a cluster's features CLIP must give one class to name it
    anchors: torch.Tensor | None = field(default=None, compare=False)  # named_clusters: [A, D] named centres
    anchor_class: torch.Tensor | None = field(default=None, compare=False)  # [A] known-class index of each anchor

    @classmethod
    def from_config(cls, cluster, known_floor: float = -1.0) -> LabelRule:
        """The rule of a :class:`~clips4.config.ClusterConfig`, with the floor the cluster stage measured."""
        return cls(cluster.labels, cluster.known_scale, cluster.known_confidence, cluster.fit_on, known_floor,
                   cluster.name_share)

    def with_floor(self, x: np.ndarray, known_text: np.ndarray, quantile: float) -> LabelRule:
        """This rule with ``known_floor`` at the ``quantile`` of the cosines of ``x`` to their nearest known text:
        that share of the features, those least like any known class, is left to the prototypes."""
        if self.labels == "nearest" or quantile <= 0 or len(known_text) == 0 or len(x) == 0:
            return self
        nearest = (torch.from_numpy(np.ascontiguousarray(x, np.float32))
                   @ torch.from_numpy(np.ascontiguousarray(known_text, np.float32)).T).max(1).values
        return replace(self, known_floor=float(torch.quantile(nearest, quantile)))

    def with_anchors(self, anchors: np.ndarray | torch.Tensor, anchor_class: np.ndarray | torch.Tensor) -> LabelRule:
        """This rule with the named centres of :func:`named_clusters` (float32 [A, D], int64 [A])."""
        return replace(self, anchors=torch.as_tensor(anchors, dtype=torch.float32),
                       anchor_class=torch.as_tensor(anchor_class, dtype=torch.int64))

    def label(self, clip_seg: torch.Tensor, targets: torch.Tensor, num_known: int) -> torch.Tensor:
        """Index into ``targets`` (known texts first) per row of ``clip_seg``: :func:`clips4.losses.semantic_labels`,
        or for ``named_clusters`` the name of the nearest centre (an anchor's class, or the prototype itself)."""
        if self.labels != "named_clusters":
            return semantic_labels(clip_seg, targets, num_known, self.labels, self.known_scale,
                                   self.known_confidence, self.known_floor)
        if self.anchors is None or self.anchor_class is None:
            raise ValueError("the named_clusters rule needs the cluster stage's anchors (LabelRule.with_anchors)")
        with torch.no_grad():
            u = clip_seg.float()
            centres = torch.cat([self.anchors.to(u), targets[num_known:].to(u)])  # anchors first: they win ties
            names = torch.cat([self.anchor_class.to(u.device),
                               num_known + torch.arange(len(targets) - num_known, device=u.device)])
            return names[(u @ centres.T).argmax(1)]

    def fit_rows(self, x: np.ndarray, known_text: np.ndarray) -> np.ndarray:
        """Rows of ``x`` the prototypes are fitted on: all, or those the rule gives no known class (named clusters
        compete with the anchors on every feature)."""
        if self.fit_on == "all" or len(known_text) == 0 or self.labels == "named_clusters":
            return np.arange(len(x))
        x, known = (torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (x, known_text))
        return np.flatnonzero(~self.known(x, known).numpy())

    def known(self, x: torch.Tensor, known_text: torch.Tensor) -> torch.Tensor:
        """Bool per row of ``x``: the known_first rule names it a known class (whatever ``labels`` says)."""
        return self.zero_shot(x, known_text) >= 0

    def zero_shot(self, x: torch.Tensor, known_text: torch.Tensor) -> torch.Tensor:
        """Per row of ``x``, the known class the known_first rule names (confident softmax, cosine above the
        floor), or -1."""
        peak, cls = known_confidence(x, known_text, self.known_scale)
        sure = (peak >= self.known_confidence) & ((x.float() @ known_text.float().T).gather(1, cls[:, None])[:, 0]
                                                  >= self.known_floor)
        return torch.where(sure, cls, -1)


@dataclass(frozen=True)
class NamedClusters:
    """The cluster stage's result under ``named_clusters``: centres CLIP names (anchors) and the rest (prototypes)."""

    anchors: np.ndarray  # float32 [A, D]
    anchor_class: np.ndarray  # int64 [A], index into the known classes
    prototypes: np.ndarray  # float32 [M, D]
    known_sizes: np.ndarray  # int64 [K], sampled points labelled each known class
    unknown_sizes: np.ndarray  # int64 [M], sampled points labelled each prototype


def named_clusters(
    features_sample: np.ndarray,
    known_text: np.ndarray,
    num_centres: int,
    rule: LabelRule,
    *,
    iterations: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 100_000,
    use_gpu: bool | None = None,
) -> NamedClusters:
    """Cluster the features into ``num_centres`` free centres, then let CLIP name the clusters, not the pixels.

    A cluster whose features the known_first part of ``rule`` names as one known class, at least ``rule.name_share``
    of them, becomes an anchor of that class; every other cluster is an unknown prototype. CLIP's zero-shot answer is
    confidently wrong on a share of the pixels of a thing no known class names; voting over a cluster of alike
    features keeps those things out of the known classes, and the anchors, being image features like the segments,
    compete with the prototypes on one scale.
    """
    x = unit_rows(features_sample, "features sample")
    known = unit_rows(known_text, "known text embeddings") if len(known_text) else known_text
    result = spherical_kmeans(x, num_centres, iterations, seed, max_points_per_centroid, use_gpu=use_gpu)
    named = (rule.zero_shot(torch.from_numpy(x), torch.from_numpy(known)).numpy() if len(known)
             else np.full(len(x), -1))
    voted = named >= 0
    classes = max(len(known), 1)
    votes = np.bincount(result.assignment[voted] * classes + named[voted],
                        minlength=num_centres * classes).reshape(num_centres, classes)  # [centre, known class]
    members = np.bincount(result.assignment, minlength=num_centres)
    names = np.where((members > 0) & (votes.max(1) >= rule.name_share * members), votes.argmax(1), -1)
    anchors, protos = result.centroids[names >= 0], result.centroids[names < 0]
    found = rule.with_anchors(anchors, names[names >= 0])
    labels = found.label(torch.from_numpy(x), torch.from_numpy(np.concatenate([known, protos])), len(known)).numpy()
    sizes = np.bincount(labels, minlength=len(known) + len(protos)).astype(np.int64)
    unnamed = sorted(set(range(len(known))) - set(names[names >= 0].tolist()))
    if unnamed:
        logger.warning("named clusters: no cluster is named as known class(es) %s; L_sem never labels them", unnamed)
    return NamedClusters(anchors, names[names >= 0], protos, sizes[: len(known)], sizes[len(known):])


def unknown_prototypes(
    features_sample: np.ndarray,
    known_text: np.ndarray,
    num_unknown: int,
    *,
    iterations: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 100_000,
    use_gpu: bool | None = None,
    rule: LabelRule = LabelRule(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prototypes [M, D], points per known class [K], points per prototype [M]) from sampled CLIP features.

    The known texts are fixed centres; the free ones are fitted on the rows ``rule`` leaves to prototypes (all of
    them when fewer than M are left). The counts are of the whole sample labelled by ``rule``.
    """
    features_sample = unit_rows(features_sample, "features sample")
    rows = rule.fit_rows(features_sample, known_text)
    if len(rows) < num_unknown:
        logger.warning("only %d of %d sampled features are left to the prototypes by the labelling rule, fewer than "
                       "the %d prototypes; fitting them on every feature", len(rows), len(features_sample), num_unknown)
        rows = np.arange(len(features_sample))
    fit = features_sample if len(rows) == len(features_sample) else features_sample[rows]
    result = spherical_kmeans(fit, num_unknown, iterations, seed, max_points_per_centroid,
                              fixed=known_text, use_gpu=use_gpu)
    num_known = len(known_text)
    protos = result.centroids[num_known:]
    labels = rule.label(torch.from_numpy(features_sample), torch.from_numpy(result.centroids), num_known)
    sizes = np.bincount(labels.numpy(), minlength=len(result.centroids)).astype(np.int64)
    return protos, sizes[:num_known], sizes[num_known:]
