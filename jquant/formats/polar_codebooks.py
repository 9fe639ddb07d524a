"""PCDVQ's data-free codebooks (Yue et al. 2025, "Distribution Aligned Codebook Construction").

After the random Hadamard transform and unit-RMS scaling, a weight chunk ``v ∈ R^k`` is close
to ``N(0, I_k)``: its magnitude ``r = ‖v‖`` follows the chi distribution with ``k`` degrees of
freedom and its direction ``v / r`` is uniform on the sphere ``S^{k-1}``. The two codebooks
match these two distributions and depend only on ``(k, a, b)``, so they are computed once and
shared by every layer (``polar_codebooks`` caches them per process).

* **Directions** ``C_d [2^a, k]`` (unit rows). Candidates are the normalised, de-duplicated
  nonzero points of a lattice inside a ball: the E8 lattice ``D8 ∪ (D8 + ½·1)`` for ``k = 8``
  (the paper); for ``k = 2, 4`` jquant uses the checkerboard lattice ``D_k`` (integer points
  with an even coordinate sum) **[inferred: the paper only uses k = 8]**. The radius is the
  smallest shell set giving ``≥ 1.5 · 2^a`` unique directions **[inferred]**. Codewords are then
  picked by greedy farthest-point selection under cosine similarity, starting from candidate 0
  of the lexicographically sorted set **[inferred start point]**.
* **Magnitudes** ``C_r [2^b]``: the Lloyd–Max quantizer of ``χ_k`` (centroid = conditional
  mean, boundary = midpoint), computed on the analytic density with the regularized incomplete
  gamma function::

      E[r | u0 < r < u1] = √2 Γ((k+1)/2) / Γ(k/2) · ΔP((k+1)/2, u²/2) / ΔP(k/2, u²/2)

``lloyd_max_gaussian`` is the scalar 2^b-level Lloyd–Max quantizer of N(0, 1), the baseline of
the spec's Gaussian check.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy import special, stats

DIRECTION_DIMS = (2, 4, 8)
TIE = 1e-6  # similarities closer than this count as equal in the greedy selection
_MAX_NORM2 = {2: 4096, 4: 256, 8: 16}  # largest ball searched for candidates, per dimension


def lattice_points(dim: int, max_norm2: float) -> np.ndarray:
    """Nonzero lattice points with squared norm ``≤ max_norm2``, float64 ``[N, dim]``.

    ``dim == 8``: E8 = D8 ∪ (D8 + ½·1) (all-integer or all-half-integer coordinates with an
    even coordinate sum). Other dims: D_dim (integer points with an even sum).
    """
    if dim not in DIRECTION_DIMS:
        raise ValueError(f"lattice_points: dim={dim!r} must be one of {DIRECTION_DIMS}.")
    c = int(math.floor(math.sqrt(max_norm2)))
    ints = np.arange(-c, c + 1, dtype=np.float64)
    out = [_even_sum_grid(ints, dim, max_norm2)]
    if dim == 8:
        halves = np.arange(-c - 0.5, c + 1.0, dtype=np.float64)
        out.append(_even_sum_grid(halves, dim, max_norm2))
    pts = np.concatenate(out)
    return pts[np.any(pts != 0, axis=1)]


def _even_sum_grid(values: np.ndarray, dim: int, max_norm2: float) -> np.ndarray:
    """Points of ``values^dim`` with even coordinate sum and squared norm ``≤ max_norm2``."""
    grid = np.zeros((1, 0))
    for _ in range(dim):  # grow one coordinate at a time, pruning by the partial norm
        grid = np.concatenate([np.repeat(grid, len(values), 0),
                               np.tile(values, len(grid))[:, None]], axis=1)
        grid = grid[(grid ** 2).sum(1) <= max_norm2 + 1e-9]
    s = grid.sum(1)
    return grid[np.isclose(np.round(s) % 2, 0) & np.isclose(s, np.round(s))]


def unique_directions(points: np.ndarray) -> np.ndarray:
    """Rows of ``points`` scaled to unit norm, de-duplicated (to 1e-6) and sorted lexicographically."""
    u = np.unique(np.round(points / np.linalg.norm(points, axis=1, keepdims=True), 6), axis=0)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def direction_candidates(dim: int, count: int) -> np.ndarray:
    """Unique lattice directions from the smallest ball (radius² a lattice norm) holding ``≥ 1.5·count``."""
    r2 = 2  # E8 and D_k squared norms are even integers
    while True:
        cands = unique_directions(lattice_points(dim, r2))
        if len(cands) >= 1.5 * count:
            return cands
        if r2 >= _MAX_NORM2[dim]:
            raise ValueError(f"direction_candidates: {count} directions in {dim} dims need too many lattice shells; "
                             f"use fewer direction bits.")
        r2 += 2


def greedy_directions(candidates: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """Greedy farthest-point selection of ``count`` rows of unit ``candidates [N, k]`` (cosine similarity).

    ``maxsim[c] = max_{s ∈ S} <c, s>``; each step adds the candidate with the smallest ``maxsim``
    (the first of those within ``TIE`` of it) and updates ``maxsim``. Deterministic. Returns float64 ``[count, k]``.
    """
    if count > len(candidates):
        raise ValueError(f"greedy_directions: count={count} exceeds the {len(candidates)} candidates.")
    cands = np.asarray(candidates, np.float32)
    chosen = np.empty(count, np.int64)
    chosen[0] = start
    maxsim = cands @ cands[start]
    for i in range(1, count):
        # first index within TIE of the minimum: lattice cosines that are equal in exact arithmetic
        # differ by float32 rounding only, and distinct ones by far more than TIE
        j = int(np.argmax(maxsim <= maxsim.min() + TIE))
        chosen[i] = j
        np.maximum(maxsim, cands @ cands[j], out=maxsim)
    return np.asarray(candidates, np.float64)[chosen]


def lloyd_max(mass: Callable[[np.ndarray, np.ndarray], np.ndarray],
              moment: Callable[[np.ndarray, np.ndarray], np.ndarray],
              init: np.ndarray, lower: float, *, tol: float = 1e-10, max_iter: int = 100_000
              ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max levels of a 1-D density from its interval mass and first moment (float64).

    ``mass(u0, u1) = ∫ p``, ``moment(u0, u1) = ∫ r p`` over ``[u0, u1]``; the support starts at
    ``lower`` (``-inf`` or 0) and is unbounded above. Iterates ``u_i = (c_i + c_{i+1})/2``,
    ``c_i = moment / mass`` until ``max |Δc| < tol``. Returns ``(levels, boundaries)``.
    """
    c = np.asarray(init, np.float64)
    for _ in range(max_iter):
        u = np.concatenate([[lower], (c[:-1] + c[1:]) / 2, [np.inf]])
        new = moment(u[:-1], u[1:]) / mass(u[:-1], u[1:])
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    return c, (c[:-1] + c[1:]) / 2


def lloyd_max_chi(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max levels and boundaries of ``χ_dim`` with ``2^bits`` levels (init: quantiles (i+½)/2^b)."""
    k = dim
    P = special.gammainc
    coef = math.sqrt(2) * math.exp(special.gammaln((k + 1) / 2) - special.gammaln(k / 2))
    mass = lambda a, b: P(k / 2, b * b / 2) - P(k / 2, a * a / 2)  # noqa: E731
    moment = lambda a, b: coef * (P((k + 1) / 2, b * b / 2) - P((k + 1) / 2, a * a / 2))  # noqa: E731
    n = 2 ** bits
    init = stats.chi.ppf((np.arange(n) + 0.5) / n, k)
    return lloyd_max(mass, moment, init, 0.0)


def lloyd_max_gaussian(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max levels and boundaries of N(0, 1) with ``2^bits`` levels."""
    mass = lambda a, b: stats.norm.cdf(b) - stats.norm.cdf(a)  # noqa: E731
    moment = lambda a, b: stats.norm.pdf(a) - stats.norm.pdf(b)  # noqa: E731
    n = 2 ** bits
    return lloyd_max(mass, moment, stats.norm.ppf((np.arange(n) + 0.5) / n), -np.inf)


@functools.lru_cache(maxsize=None)
def polar_codebooks(dim: int, direction_bits: int, magnitude_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(C_d [2^a, dim], C_r [2^b])`` float32, cached per process (read-only arrays)."""
    n = 2 ** direction_bits
    directions = greedy_directions(direction_candidates(dim, n), n).astype(np.float32)
    magnitudes = lloyd_max_chi(dim, magnitude_bits)[0].astype(np.float32)
    directions.flags.writeable = False
    magnitudes.flags.writeable = False
    return directions, magnitudes
