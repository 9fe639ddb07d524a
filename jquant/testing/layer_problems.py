"""A weight matrix with a correlated-input Hessian, and the output error a weight quantizer is judged by."""

from __future__ import annotations

import numpy as np


def correlated_layer(seed: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``w [n, m]`` float32 and ``H = XᵀX / N`` ``[n, n]`` float32 of correlated, unevenly scaled inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1024, n)) @ (np.eye(n) + 0.4 * rng.standard_normal((n, n)))
    x *= np.exp(rng.standard_normal(n))[None]
    return (rng.standard_normal((n, m)) * 0.05).astype(np.float32), (x.T @ x / len(x)).astype(np.float32)


def relative_output_error(w: np.ndarray, w_hat, h: np.ndarray) -> float:
    """``tr(Eᵀ H E) / tr(Wᵀ H W)`` with ``E = w_hat - w``, in float64."""
    w = np.asarray(w, np.float64)
    e = np.asarray(w_hat, np.float64) - w
    h = np.asarray(h, np.float64)
    return float(np.trace(e.T @ h @ e) / np.trace(w.T @ h @ w))
