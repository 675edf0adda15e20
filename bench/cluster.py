"""FAISS spherical k-means (clips4.prototypes) vs scikit-learn KMeans on clustered unit vectors.

Both see the same data, the same number of centres and iterations, one initialisation each, and are scored with
the same formula: the within-cluster sum of squares of the partition each one returns (so the spherical and the
Euclidean centroids are judged on equal terms). Each runs once on a small slice first, so neither pays its
thread pools' start-up inside the timing, and each is timed ``--repeats`` times; the ratio is of the medians.
Run: python bench/cluster.py [--n 200000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus

from clips4.prototypes import spherical_kmeans


def blobs(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around ``centres`` random directions (cosine to their centre about 0.7), float32."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = means[rng.integers(centres, size=n)]
    x += rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def partition_sse(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Sum over clusters of squared distances to the cluster mean: sum |x|^2 - sum_c |S_c|^2 / n_c."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, labels, x.astype(np.float64))
    used = counts > 0
    return float((x.astype(np.float64) ** 2).sum() - ((sums[used] ** 2).sum(1) / counts[used]).sum())


def timed(fn, x: np.ndarray, repeats: int):
    """(median seconds over ``repeats`` calls of ``fn(x)``, the last call's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="points")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=64, help="centres (also the number of blobs)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the ratio is of the medians")
    parser.add_argument("--max-points-per-centroid", type=int, default=None,
                        help="FAISS-side subsampling cap (default: none, both cluster every point)")
    args = parser.parse_args()

    x = blobs(args.n, args.dim, args.k, args.seed)
    cap = args.max_points_per_centroid or args.n
    print(f"data: {args.n} x {args.dim} unit vectors, {args.k} blobs; k={args.k}, {args.iterations} iterations, "
          f"faiss max_points_per_centroid={cap}")

    def ours(points: np.ndarray):
        return spherical_kmeans(points, args.k, args.iterations, args.seed, max_points_per_centroid=cap)

    def sklearn(points: np.ndarray):
        # KMeans' own default init (k-means++ with this seed), timed apart so the report shows where the time goes
        start = time.perf_counter()
        seeds, _ = kmeans_plusplus(points, args.k, random_state=args.seed)
        t_init = time.perf_counter() - start
        fitted = KMeans(args.k, init=seeds, n_init=1, max_iter=args.iterations, tol=0.0, algorithm="lloyd").fit(points)
        return fitted, t_init

    warm = x[: 20 * args.k]  # thread pools and first-call set-up, outside the timing
    ours(warm)
    sklearn(warm)
    t_faiss, result = timed(ours, x, args.repeats)
    t_sklearn, (reference, t_init) = timed(sklearn, x, args.repeats)

    sse_faiss = partition_sse(x, result.assignment, args.k)
    sse_sklearn = partition_sse(x, reference.labels_, args.k)
    print(f"faiss:   {t_faiss:8.2f} s  within-cluster SSE {sse_faiss:.1f}")
    print(f"sklearn: {t_sklearn:8.2f} s  within-cluster SSE {sse_sklearn:.1f}  (last run: k-means++ init "
          f"{t_init:.2f} s, {reference.n_iter_} Lloyd iterations)")
    print(f"faiss/sklearn: {t_sklearn / t_faiss:.1f}x faster (median of {args.repeats}), "
          f"inertia ratio {sse_faiss / sse_sklearn:.3f}")


if __name__ == "__main__":
    main()
