"""Offline parts of 6Bit-Diffusion from measured runs (numpy): the predictor fit, τ_q for a bit budget and the static
timestep-aware schedule of the ViDiT-Q-style baseline.

Inputs are the logs of measured runs (``sample_six_bit(..., measure=True)``, one per calibration prompt) stacked on a
leading run axis: ``gamma [R, S, B]`` (Γ_{b,t}, Eq. 3) and ``erel [R, S, B, L]`` (E_rel,l,t: NVFP4's relative output
error of linear l at step t, Frobenius norms, same weights on both sides).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jquant.video_mixed.config import INT8, NVFP4, ROUTE_BITS


@dataclasses.dataclass(frozen=True)
class PredictorFit:
    """Per block and routed linear: ``Ê_l,t = alpha Γ_{b,t−1} + beta`` (least squares), its Pearson ``r`` and the
    pooled Pearson correlation over every (block, linear, step) pair (``r_pooled``); NaN where Γ does not vary."""

    alpha: np.ndarray
    beta: np.ndarray
    r: np.ndarray
    r_pooled: float


def _check(gamma: np.ndarray, erel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gamma, erel = np.asarray(gamma, np.float64), np.asarray(erel, np.float64)
    if gamma.ndim != 3 or erel.ndim != 4 or erel.shape[:3] != gamma.shape or gamma.shape[1] < 2:
        raise ValueError(f"gamma must be [runs, steps >= 2, blocks] and erel [runs, steps, blocks, linears] of the "
                         f"same runs, steps and blocks; got {gamma.shape} and {erel.shape}.")
    if not (np.all(np.isfinite(gamma)) and np.all(np.isfinite(erel))):
        raise ValueError("gamma and erel must be finite: measure along runs without block skipping.")
    return gamma, erel


def pairs(gamma: np.ndarray, erel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x [R (S-1), B, L], y [R (S-1), B, L])``: Γ_{b,t−1} against E_rel,l,t for t >= 1 (the paper's pairs)."""
    gamma, erel = _check(gamma, erel)
    x = np.broadcast_to(gamma[:, :-1, :, None], erel[:, 1:].shape)
    return x.reshape(-1, *erel.shape[2:]), erel[:, 1:].reshape(-1, *erel.shape[2:])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D samples (NaN when either is constant)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    den = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / den) if den > 0 else float("nan")


def fit_predictor(gamma: np.ndarray, erel: np.ndarray) -> PredictorFit:
    """Least-squares ``(α_l, β_l)`` of E_rel,l,t on Γ_{b,t−1} per block and linear (spec §3.2), with Pearson r."""
    x, y = pairs(gamma, erel)
    _, blocks, linears = x.shape
    alpha, beta, r = (np.zeros((blocks, linears)) for _ in range(3))
    for b in range(blocks):
        for l in range(linears):
            xs, ys = x[:, b, l], y[:, b, l]
            var = np.var(xs)
            alpha[b, l] = np.mean((xs - xs.mean()) * (ys - ys.mean())) / var if var > 0 else 0.0
            beta[b, l] = ys.mean() - alpha[b, l] * xs.mean()
            r[b, l] = pearson(xs, ys)
    return PredictorFit(alpha=alpha, beta=beta, r=r, r_pooled=pearson(x.reshape(-1), y.reshape(-1)))


def nvfp4_share(target_bits: float) -> float:
    """The input-width-weighted share of NVFP4 evaluations giving ``target_bits`` between NVFP4 and INT8."""
    low, high = ROUTE_BITS[NVFP4], ROUTE_BITS[INT8]
    if not low <= target_bits <= high:
        raise ValueError(f"target_bits must lie in [{low}, {high}] (between NVFP4 and INT8), got {target_bits}.")
    return (high - target_bits) / (high - low)


def choose_tau_q(fit: PredictorFit, gamma: np.ndarray, in_features: tuple[int, ...], target_bits: float) -> float:
    """The smallest ``τ_q >= 0`` at which the predictor routes an input-width-weighted share of the calibration
    evaluations (step 0 always INT8) to NVFP4 of at least ``nvfp4_share(target_bits)``; the largest prediction if
    that share is out of reach."""
    share = nvfp4_share(target_bits)
    gamma = np.asarray(gamma, np.float64)
    runs, steps, blocks = gamma.shape
    pred = fit.alpha[None, None] * gamma[:, :-1, :, None] + fit.beta[None, None]  # [R, S-1, B, L]
    weight = np.broadcast_to(np.asarray(in_features, np.float64), pred.shape)
    total = runs * steps * blocks * float(np.sum(in_features))
    order = np.argsort(pred, axis=None)
    cumulative = np.cumsum(weight.reshape(-1)[order]) / total
    k = min(int(np.searchsorted(cumulative, share - 1e-12)), len(order) - 1)
    return max(float(pred.reshape(-1)[order][k]), 0.0)


def static_schedule(erel: np.ndarray, in_features: tuple[int, ...], target_bits: float) -> np.ndarray:
    """ViDiT-Q-style static timestep-aware mixed precision: ``[S, B, L]`` routes giving NVFP4 to the (step, block,
    linear) slots of lowest mean calibration sensitivity until their input-width-weighted share reaches
    ``nvfp4_share(target_bits)``; INT8 elsewhere."""
    erel = np.asarray(erel, np.float64)
    mean = erel.mean(axis=0)  # [S, B, L]
    weight = np.broadcast_to(np.asarray(in_features, np.float64), mean.shape).reshape(-1)
    order = np.argsort(mean, axis=None, kind="stable")
    cumulative = np.cumsum(weight[order]) / np.sum(weight)
    chosen = order[: int(np.searchsorted(cumulative, nvfp4_share(target_bits) + 1e-12, side="right"))]
    routes = np.full(mean.size, INT8, np.int32)
    routes[chosen] = NVFP4
    return routes.reshape(mean.shape)
