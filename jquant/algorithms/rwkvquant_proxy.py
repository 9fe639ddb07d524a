"""RWKVQuant's coarse-to-fine proxy (Xu et al., ICML 2025, arXiv 2505.03803, §3.2): scalar or vector quantization?

Pure numpy maths on one weight matrix ``W`` (any shape; it is flattened). Following the released
code's variant (``coherent_type="incoherent"``, the bug fixed as in its ``hce_v2`` branch):

1. Sort the entries of ``W`` viewed in its storage precision (``view_dtype``, float16 by default:
   the published thresholds are on that scale), take the gaps ``g_i = w₍i+1₎ − w₍i₎``, keep the
   **distinct** non-zero gaps and normalise them: ``p_i = g_i / Σ_j g_j`` over ``n`` gaps.
2. Coarse proxy (the entropy deficit of the gap distribution; 0 iff all gaps are equal)::

       P_c = ln n − H(p) = ln n + Σ_i p_i ln p_i   ≥ 0

3. Fine proxy (the Taylor expansion of ``P_c`` around the uniform distribution, orders 2..4;
   it blows up when one gap is large, i.e. with outliers), with ``δ_i = p_i − 1/n`` and
   ``M_k = (1/n) Σ_i δ_i^k``::

       P_f = Σ_{k=2}^{4} n^k / (k(k−1)) · |M_k| = (n²/2)|M₂| + (n³/6)|M₃| + (n⁴/12)|M₄|

4. Decision: scalar quantization (GPTQ) iff ``P_c < τ_c`` **and** ``P_f < τ_f`` (close to
   uniform and no outliers), otherwise vector quantization. The thresholds are either fixed
   (``τ_c = 1.54``, ``τ_f = 30``: the values quoted for RWKV-7) or set per model so that a
   target fraction of the matrices takes VQ (``percentile_thresholds``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TAU_C = 1.54
TAU_F = 30.0


@dataclasses.dataclass(frozen=True)
class Proxy:
    """``coarse`` (``P_c``), ``fine`` (``P_f``) and ``gaps`` (``n``, the number of distinct non-zero gaps)."""

    coarse: float
    fine: float
    gaps: int


def gap_distribution(weight: np.ndarray, view_dtype: str | None = "float16") -> np.ndarray:
    """``p [n]``: the distinct non-zero gaps of the sorted entries of ``weight``, normalised to sum 1 (step 1).

    ``weight`` is first cast to ``view_dtype`` (None: use it as it is); gaps are taken in float64.
    A constant weight has no gaps (``n = 0``); both proxies call it uniform (0).
    """
    w = np.asarray(weight)
    if w.size < 2:
        raise ValueError(f"the RWKVQuant proxy needs a weight with at least 2 entries, got shape {w.shape}.")
    if view_dtype is not None:
        w = w.astype(np.dtype(view_dtype))
    w = np.sort(w.astype(np.float64).ravel())
    if not np.all(np.isfinite(w)):
        raise ValueError("the RWKVQuant proxy needs finite weights (in the view dtype); the weight holds NaN or Inf.")
    gaps = np.unique(np.diff(w))
    gaps = gaps[gaps > 0]
    return gaps / gaps.sum() if gaps.size else gaps


def coarse_proxy(p: np.ndarray) -> float:
    """``P_c = ln n + Σ p_i ln p_i`` for a distribution ``p [n]`` with positive entries (step 2)."""
    p = np.asarray(p, np.float64)
    return max(float(np.log(p.size) + np.sum(p * np.log(p))), 0.0) if p.size else 0.0


def fine_proxy(p: np.ndarray, order: int = 4) -> float:
    """``P_f = Σ_{k=2}^{order} n^k / (k(k−1)) |M_k|`` with ``M_k = mean((p − 1/n)^k)`` (step 3)."""
    p = np.asarray(p, np.float64)
    n = p.size
    if n == 0:
        return 0.0
    delta = p - 1.0 / n
    return float(sum(n**k / (k * (k - 1)) * abs(np.mean(delta**k)) for k in range(2, order + 1)))


def proxy(weight: np.ndarray, view_dtype: str | None = "float16") -> Proxy:
    """Both proxies of one weight matrix (steps 1-3)."""
    p = gap_distribution(weight, view_dtype)
    return Proxy(coarse=coarse_proxy(p), fine=fine_proxy(p), gaps=int(p.size))


def check_thresholds(tau_c: float, tau_f: float) -> None:
    """Raise unless both thresholds are numbers ``>= 0`` (``inf``: that proxy never asks for VQ)."""
    for name, value in (("tau_c", tau_c), ("tau_f", tau_f)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or np.isnan(value) or value < 0:
            raise ValueError(f"RWKVQuant threshold {name}={value!r} must be a number >= 0 (the paper's RWKV-7 "
                             f"values are tau_c={TAU_C}, tau_f={TAU_F}).")


def use_vector(coarse: np.ndarray, fine: np.ndarray, tau_c: float = TAU_C, tau_f: float = TAU_F) -> np.ndarray:
    """The coarse-to-fine decision (step 4), element-wise: True = vector quantization, False = scalar (GPTQ).

    A matrix the coarse proxy calls non-uniform (``P_c ≥ τ_c``) takes VQ; one it calls uniform is
    checked for outliers by the fine proxy (``P_f ≥ τ_f`` → VQ).
    """
    check_thresholds(tau_c, tau_f)
    coarse, fine = np.asarray(coarse, np.float64), np.asarray(fine, np.float64)
    return (coarse >= tau_c) | (fine >= tau_f)


def percentile_thresholds(coarse: np.ndarray, fine: np.ndarray, vq_fraction: float = 0.1) -> tuple[float, float]:
    """Per-model thresholds ``(τ_c, τ_f)`` under which about ``vq_fraction`` of the matrices take VQ.

    Each matrix is scored by ``s = max(F_c(P_c), F_f(P_f))`` with ``F`` the empirical CDF of each
    proxy over the model's matrices (both proxies at the same percentile level); the
    ``k = round(vq_fraction · N)`` highest-scored matrices are sent to VQ, and ``τ_c``, ``τ_f``
    are the smallest proxy values above the level that separates them (``inf`` when no matrix is
    above it), so ``use_vector(coarse, fine, τ_c, τ_f)`` reproduces the split (up to ties).
    """
    coarse, fine = np.asarray(coarse, np.float64).ravel(), np.asarray(fine, np.float64).ravel()
    if coarse.shape != fine.shape or coarse.size == 0:
        raise ValueError(f"percentile_thresholds needs equally long non-empty proxy lists, got {coarse.size} and "
                         f"{fine.size}.")
    if isinstance(vq_fraction, bool) or not isinstance(vq_fraction, (int, float)) or not 0 <= vq_fraction <= 1:
        raise ValueError(f"RWKVQuant vq_fraction={vq_fraction!r} must be a number in [0, 1] (the paper: about 0.1).")
    cdf_c = np.searchsorted(np.sort(coarse), coarse, side="right") / coarse.size
    cdf_f = np.searchsorted(np.sort(fine), fine, side="right") / fine.size
    score = np.maximum(cdf_c, cdf_f)
    k = int(round(vq_fraction * score.size))
    level = 1.0 if k == 0 else np.sort(score)[::-1][k - 1] - 1e-12
    above_c, above_f = coarse[cdf_c > level], fine[cdf_f > level]
    tau_c = float(above_c.min()) if above_c.size else float("inf")
    tau_f = float(above_f.min()) if above_f.size else float("inf")
    return tau_c, tau_f
