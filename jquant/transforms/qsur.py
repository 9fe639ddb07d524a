"""QSUR, the quantization space utilization rate (OSTQuant spec §3.2, exact box of §7.8).

Activations ``X ~ N(μ, Σ)`` with eigenvalues ``λ_i`` of ``Σ``. The confidence ellipsoid
``{x : (x-μ)ᵀ Σ⁻¹ (x-μ) ≤ c}``, ``c = χ²_d(α)``, has volume

    ``V_X = π^{d/2} / Γ(d/2 + 1) · c^{d/2} · Π_i λ_i^{1/2}``.

Per-token quantization uses one range for all coordinates, i.e. a hypercube. Its edge is the
exact coordinate range of the ellipsoid, whose extremes are ``μ_j ± sqrt(c Σ_jj)``:

    ``V_S = (max_j(μ_j + sqrt(c Σ_jj)) - min_j(μ_j - sqrt(c Σ_jj)))^d``,  ``QSUR = V_X / V_S``.

The paper estimates the box from the principal-axis end points instead (its eq. 3–7), which
underestimates the coordinate extremes; jquant uses the exact box (spec §7.8). For ``μ = 0``
the confidence level cancels:
``QSUR = π^{d/2} / (Γ(d/2+1) 2^d) · Π λ_i^{1/2} / (max_j Σ_jj)^{d/2}``, at most the ball-to-cube
ratio ``π^{d/2} / (Γ(d/2+1) 2^d)`` (all ``λ_i`` equal and all ``Σ_jj`` equal).

Numerics: a host diagnostic in float64 numpy, computed in the log domain (``lgamma``, sums of
logs) so ``d = 4096`` neither under- nor overflows before the final ``exp``. Eigenvalues of ``Σ``
are clipped below at ``eps_float64 · λ_max``, the resolution of ``eigvalsh``, so a singular
covariance (e.g. fewer samples than dimensions) gives a tiny but finite value rather than
``log 0``. ``c = χ²_d(α)`` uses the Wilson–Hilferty approximation
``d (1 - 2/(9d) + z_α sqrt(2/(9d)))³``, so scipy is not needed. At ``α = 0.99`` its relative
error is below 1% for every ``d`` and below ``2·10⁻⁴`` for ``d ≥ 64``; ``c`` only matters
through the mean offset, since it cancels when ``μ = 0``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike


def _chi2_quantile(alpha: float, d: int) -> float:
    """Wilson–Hilferty ``χ²_d(α) ≈ d (1 - 2/(9d) + z_α sqrt(2/(9d)))³`` with ``z_α`` the normal quantile."""
    k = 2.0 / (9.0 * d)
    return d * (1.0 - k + NormalDist().inv_cdf(alpha) * math.sqrt(k)) ** 3


def _log_qsur(cov: np.ndarray, mean: np.ndarray, alpha: float) -> float:
    """``log V_X - log V_S`` for ``cov [d, d]`` (symmetric) and ``mean [d]``, float64."""
    d = cov.shape[0]
    lam = np.linalg.eigvalsh(cov)
    lam = np.maximum(lam, np.finfo(np.float64).eps * lam.max())
    c = _chi2_quantile(alpha, d)
    log_vx = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0) + 0.5 * d * math.log(c)
    log_vx += 0.5 * float(np.sum(np.log(lam)))
    half = np.sqrt(c * np.maximum(np.diagonal(cov), 0.0))
    edge = float(np.max(mean + half) - np.min(mean - half))
    return log_vx - d * math.log(edge)


def qsur_from_covariance(
    cov: ArrayLike, mean: ArrayLike | None = None, normalized: bool = True, *, alpha: float = 0.99
) -> float:
    """QSUR of ``N(mean, cov)`` (module docstring); ``QSUR^{1/d}`` when ``normalized``.

    ``cov``: ``[d, d]`` covariance (symmetrised as ``(Σ + Σᵀ)/2``); ``mean``: ``[d]``, default 0,
    where ``α`` (confidence level, ``0.5 ≤ α < 1``) cancels. Unnormalised values underflow to 0.0
    for large ``d`` (the ball-to-cube ratio alone is ``~10^{-d}``); use ``normalized=True`` there.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] < 1:
        raise ValueError(f"cov must be a square [d, d] matrix with d >= 1; got shape {cov.shape}")
    d = cov.shape[0]
    mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
    if mean.shape != (d,):
        raise ValueError(f"mean must have shape ({d},) to match cov; got {mean.shape}")
    if not (0.5 <= alpha < 1.0):
        raise ValueError(f"alpha is a confidence level in [0.5, 1); got {alpha}")
    if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(mean))):
        raise ValueError("cov and mean must be finite")
    cov = 0.5 * (cov + cov.T)
    if np.max(np.diagonal(cov)) <= 0.0:
        raise ValueError("cov has no positive variance: QSUR is undefined for constant data")
    log_q = _log_qsur(cov, mean, alpha)
    return float(math.exp(log_q / d if normalized else log_q))


def qsur(x: ArrayLike, normalized: bool = True, *, alpha: float = 0.99) -> float:
    """QSUR of samples ``x [N, d]`` (rows are tokens) from their sample mean and covariance.

    ``μ = mean_n x_n``, ``Σ = Σ_n (x_n - μ)(x_n - μ)ᵀ / (N - 1)``, both in float64, then
    :func:`qsur_from_covariance`. Needs ``N ≥ 2``; ``N > d`` for a non-singular ``Σ``.
    Returns ``QSUR^{1/d}`` when ``normalized`` (the value the paper plots), as a Python float.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array [N, d] of N samples; got shape {x.shape}")
    n, d = x.shape
    if n < 2 or d < 1:
        raise ValueError(f"x needs N >= 2 samples of dimension d >= 1; got shape {x.shape}")
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    return qsur_from_covariance(centred.T @ centred / (n - 1), mean, normalized, alpha=alpha)
