"""Weighted k-means with k-means++ initialisation (numpy, float64): the one k-means of jquant.

Used by SKVQ's channel clustering (points are per-channel (min, max) pairs) and by
vector quantization (points are weight sub-vectors, weighted by the Hessian diagonal).

Objective (Lloyd 1982, weighted)::

    minimise  sum_i  sum_j  w_ij (x_ij - c_{l(i), j})^2

with per-point weights ``w_i`` (``[N]``) or per-coordinate weights ``w_ij`` (``[N, d]``).
The assignment step takes ``l(i) = argmin_c sum_j w_ij (x_ij - c_j)^2``; the update
step sets each centroid coordinate to the ``w``-weighted mean of its members.
Initialisation is k-means++ (Arthur & Vassilvitskii 2007): the first centre is drawn
with probability proportional to the point's total weight, each next one with
probability proportional to ``weight * distance^2`` to the nearest chosen centre.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """``centroids [k, d]``, ``labels [N]`` (int64) and ``inertia`` (the weighted objective)."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float


def _check(points: np.ndarray, k: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(points, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans: points must be a non-empty [N, d] array, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("kmeans: points contain NaN or inf.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: k={k!r} must be an int in [1, N={x.shape[0]}].")
    if weights is None:
        w = np.ones_like(x)
    else:
        w = np.asarray(weights, np.float64)
        if w.shape == (x.shape[0],):
            w = np.broadcast_to(w[:, None], x.shape)
        if w.shape != x.shape:
            raise ValueError(f"kmeans: weights must have shape [N]={x.shape[:1]} or [N, d]={x.shape}, got {w.shape}.")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("kmeans: weights must be finite and non-negative.")
    return x, np.array(w)


def _distances(x: np.ndarray, w: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Weighted squared distances ``[N, k]``: ``sum_j w_ij (x_ij - c_kj)^2``."""
    # expand (x - c)^2 = x^2 - 2xc + c^2 so the [N, k, d] tensor is never built
    return ((w * x * x).sum(1)[:, None] - 2.0 * (w * x) @ centroids.T + w @ (centroids * centroids).T).clip(min=0.0)


def _plus_plus(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    total = w.sum(1)
    p = total / total.sum() if total.sum() > 0 else np.full(len(x), 1.0 / len(x))
    centres = [x[rng.choice(len(x), p=p)]]
    nearest = _distances(x, w, np.array(centres))[:, 0]
    for _ in range(1, k):
        mass = nearest.sum()
        idx = rng.choice(len(x), p=nearest / mass) if mass > 0 else rng.integers(len(x))
        centres.append(x[idx])
        nearest = np.minimum(nearest, _distances(x, w, x[idx][None])[:, 0])
    return np.array(centres)


def _lloyd(x, w, centroids, iters, tol):
    for _ in range(iters):
        labels = _distances(x, w, centroids).argmin(1)
        new = centroids.copy()
        for c in range(len(centroids)):
            members = labels == c
            mass = w[members].sum(0)
            if members.any():
                # coordinates with zero total weight keep the plain mean of the members
                mean = x[members].mean(0)
                new[c] = np.where(mass > 0, (w[members] * x[members]).sum(0) / np.where(mass > 0, mass, 1.0), mean)
        shift = np.abs(new - centroids).max()
        centroids = new
        if shift <= tol:
            break
    d = _distances(x, w, centroids)
    labels = d.argmin(1)
    return centroids, labels, float(d[np.arange(len(x)), labels].sum())


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    seed: int = 0,
    n_init: int = 1,
    iters: int = 50,
    tol: float = 0.0,
) -> KMeansResult:
    """Cluster ``points [N, d]`` into ``k`` groups; the best of ``n_init`` k-means++ starts.

    Args:
      points: ``[N, d]`` data (float64 internally).
      k: number of clusters, ``1 <= k <= N``.
      weights: ``[N]`` per-point or ``[N, d]`` per-coordinate non-negative weights.
      seed: seeds ``numpy.random.default_rng``; the result is a deterministic function of it.
      n_init: independent starts; the one with the lowest weighted inertia is returned.
      iters: maximum Lloyd iterations per start.
      tol: stop when no centroid coordinate moves more than ``tol``.

    An empty cluster keeps its previous centroid. Labels are those of the final
    centroids (one more assignment step after the last update).
    """
    x, w = _check(points, k, weights)
    if n_init < 1 or iters < 0:
        raise ValueError(f"kmeans: n_init={n_init} must be >= 1 and iters={iters} >= 0.")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        c, labels, inertia = _lloyd(x, w, _plus_plus(x, w, k, rng), iters, tol)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centroids=c, labels=labels.astype(np.int64), inertia=inertia)
    return best
