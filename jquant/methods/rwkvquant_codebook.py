"""RWKVQuant's codebook pieces (Xu et al., ICML 2025, arXiv 2505.03803, §3.4-3.5 as the released code runs them).

- ``mahalanobis_init``: the k-means start of the paper's code (GPTVQ's ``mahalanobis_init``): centre the
  group's points ``x_i [d]`` on their mean ``μ``, take ``Σ = Σ_i (x_i − μ)(x_i − μ)ᵀ``, rank the points by the
  Mahalanobis distance ``D_i = (x_i − μ)ᵀ Σ⁻¹ (x_i − μ)`` and take the points at the ``k`` evenly spaced ranks
  ``round(linspace(0, N − 1, k))`` as centroids (in 1-D: ranks of the standardised squared distance from the
  mean, so the centroids span the inner to the outer points).
- ``fit_codebook``: that start (or jquant's k-means++) followed by weighted Lloyd iterations
  (``jquant.numerics.kmeans``).
- ``compress_codebooks``: the codebooks of one fitting step (one row group of a ``[in, out]`` weight: ``G``
  column groups, each ``K`` codewords of ``d``), stacked as ``C [G, K·d]`` with each 1-D codebook sorted, then
  (``svd_rank`` r) ``C ≈ A V`` with ``A = (U Σ)[:, :r]`` per group and ``V = Vᵀ[:r]`` shared (Eckart-Young), and
  (``bits`` b) ``A`` (or ``C``) stored as symmetric b-bit integers with one scale per step:
  ``s = max|A| / (2^{b−1} − 1)``, ``A_int = round(A / s)``. Decoded codebooks are ``s · A_int V``.
- ``codebook_storage``: the arrays that representation stores (shapes and dtypes), from which the honest bits
  per weight follow (``CompressedCodebooks.nbytes`` of the arrays themselves equals it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import numpy as np

from jquant.numerics.kmeans import KMeansResult, _check, _lloyd, kmeans

KMeansInit = Literal["mahalanobis", "kmeans++"]
KMEANS_INITS: tuple[str, ...] = ("mahalanobis", "kmeans++")


def mahalanobis_init(points: np.ndarray, k: int) -> np.ndarray:
    """Initial centroids ``[k, d]`` for ``points [N, d]`` (``k <= N``): the points at ranks
    ``round(linspace(0, N − 1, k))`` of ``D_i = (x_i − μ)ᵀ Σ⁻¹ (x_i − μ)`` (stable sort; ``Σ⁻¹`` is the
    pseudo-inverse when ``Σ`` is singular, e.g. for constant points)."""
    x = np.asarray(points, np.float64)
    if x.ndim != 2 or not 1 <= k <= len(x):
        raise ValueError(f"mahalanobis_init: points must be [N, d] with 1 <= k <= N, got shape {x.shape} and k={k}.")
    centred = x - x.mean(0)
    precision = np.linalg.pinv(centred.T @ centred)
    distance = np.einsum("nd,de,ne->n", centred, precision, centred)
    ranks = np.round(np.linspace(0, len(x) - 1, k)).astype(np.int64)
    return x[np.argsort(distance, kind="stable")[ranks]]


def fit_codebook(points: np.ndarray, k: int, *, weights: np.ndarray | None = None, init: KMeansInit = "mahalanobis",
                 iters: int = 100, seed: int = 0) -> KMeansResult:
    """Weighted k-means of ``points [N, d]`` into ``k`` centroids (``jquant.numerics.kmeans``'s Lloyd
    iterations and objective ``Σ_ij w_ij (x_ij − c_{l(i) j})²``) from ``init``: ``"mahalanobis"``
    (``mahalanobis_init``, the paper's code) or ``"kmeans++"`` (``seed`` draws it)."""
    if init not in KMEANS_INITS:
        raise ValueError(f"fit_codebook: init must be one of {KMEANS_INITS}, got {init!r}.")
    if init == "kmeans++":
        return kmeans(points, k, weights=weights, seed=seed, iters=iters)
    x, w = _check(points, k, weights)
    centroids, labels, inertia = _lloyd(x, w, mahalanobis_init(x, k), iters, 0.0)
    return KMeansResult(centroids=centroids, labels=labels.astype(np.int64), inertia=inertia)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodebookCompression:
    """``svd_rank``: keep ``r`` singular directions of the stacked codebooks (None: no SVD); ``bits``: 8 stores the
    codebooks (or the SVD coefficients) as symmetric int8 with one float16 scale per fitting step (None: float16). The paper's README setting is ``svd_rank = K / 2`` (``--svd-rank 0.5``), ``bits = 8``."""

    svd_rank: int | None = None
    bits: int | None = 8

    def __post_init__(self):
        if self.svd_rank is not None and (isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int)
                                          or self.svd_rank < 1):
            raise ValueError(f"CodebookCompression.svd_rank must be a positive int or None, got {self.svd_rank!r}.")
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits != 8):
            raise ValueError(f"CodebookCompression.bits must be 8 (int8 codebooks, the paper's) or None (float16), "
                             f"got {self.bits!r}.")

    @property
    def active(self) -> bool:
        return self.svd_rank is not None or self.bits is not None


@dataclasses.dataclass(frozen=True)
class CompressedCodebooks:
    """One fitting step's codebooks as stored: ``coeffs [G, r or K·d]`` (int8 when quantized, else float16),
    ``basis [r, K·d]`` float16 (None without SVD), ``scale [1]`` float16 (None when not quantized); ``K``, ``d``."""

    coeffs: np.ndarray
    basis: np.ndarray | None
    scale: np.ndarray | None
    K: int
    d: int

    def decompress(self) -> np.ndarray:
        """Codebooks ``[G, K, d]`` float32: ``s · A_int V`` (or the parts present)."""
        c = self.coeffs.astype(np.float32)
        if self.scale is not None:
            c = c * self.scale.astype(np.float32)[0]
        if self.basis is not None:
            c = c @ self.basis.astype(np.float32)
        return c.reshape(len(c), self.K, self.d)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.coeffs, self.basis, self.scale) if a is not None)


def _rank(books: np.ndarray, compression: CodebookCompression) -> int | None:
    K, d = books.shape[1:]
    return None if compression.svd_rank is None else min(compression.svd_rank, len(books), K * d)


def compress_codebooks(books: np.ndarray, compression: CodebookCompression) -> CompressedCodebooks:
    """Compress one fitting step's codebooks ``books [G, K, d]`` (module doc): sort each 1-D codebook, rank-r
    SVD (``A = (UΣ)[:, :r]``, ``V = Vᵀ[:r]``), symmetric integer coefficients with one scale."""
    books = np.asarray(books, np.float64)
    if books.ndim != 3:
        raise ValueError(f"compress_codebooks: books must be [G, K, d], got shape {books.shape}.")
    G, K, d = books.shape
    flat = (np.sort(books[..., 0], axis=1) if d == 1 else books.reshape(G, K * d)).reshape(G, K * d)
    basis, r = None, _rank(books, compression)
    if r is not None:
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        basis = vt[:r].astype(np.float16)
        # least-squares coefficients for the stored (float16) basis: (UΣ)[:, :r] up to the basis' rounding
        flat = np.linalg.lstsq(basis.astype(np.float64).T, flat.T, rcond=None)[0].T
    scale = None
    if compression.bits is not None:
        qmax = 2 ** (compression.bits - 1) - 1
        top = np.abs(flat).max()
        scale = np.array([top / qmax if top > 0 else 1.0], np.float16)
        flat = np.clip(np.round(flat / scale.astype(np.float64)[0]), -qmax, qmax).astype(np.int8)
    else:
        flat = flat.astype(np.float16)
    return CompressedCodebooks(coeffs=flat, basis=basis, scale=scale, K=K, d=d)


def codebook_storage(groups: int, K: int, d: int, compression: CodebookCompression) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays ``compress_codebooks`` stores for ``groups`` codebooks of ``K × d`` (one fitting step)."""
    r = None if compression.svd_rank is None else min(compression.svd_rank, groups, K * d)
    out = {"coeffs": jax.ShapeDtypeStruct((groups, r or K * d), np.int8 if compression.bits else np.float16)}
    if r is not None:
        out["basis"] = jax.ShapeDtypeStruct((r, K * d), np.float16)
    if compression.bits is not None:
        out["scale"] = jax.ShapeDtypeStruct((1,), np.float16)
    return out


def storage_bits(storage: dict[str, jax.ShapeDtypeStruct]) -> int:
    """Bits of the arrays in ``storage``."""
    return sum(8 * math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in storage.values())
