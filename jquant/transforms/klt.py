"""MambaQuant's KLT-enhanced rotation ``R = K H`` (Xu et al., 2025, spec §3.3–3.4).

For activations ``X [T, n]`` with centred covariance ``Σ = K Λ Kᵀ`` (``K`` orthogonal, the
eigenvectors as columns; the Karhunen–Loève transform) and an orthonormal Hadamard ``H``
(every entry ``±1/√n``), the rotated activations ``X K H`` have covariance ``Hᵀ Λ H``, so

    Var((X K H)_j) = Σ_a λ_a H_aj² = tr(Σ) / n   for every channel j,

whereas a Hadamard alone leaves ``Var((X H)_j) = tr(Σ)/n + Σ_{a≠b} H_aj H_bj Σ_ab``, which
depends on ``j`` whenever channels are correlated. ``R`` is folded into weights like any
orthogonal map (``X Wᵀ = (X R)(W R)ᵀ``). Everything is float64 numpy on the host.
"""

from __future__ import annotations

import jax
import numpy as np

from jquant.numerics.hadamard import hadamard_numpy, pad_to_hadamard_size, supported_size

ORTHOGONALITY_TOL = 1e-4


def klt_basis(covariance: np.ndarray) -> np.ndarray:
    """``K [n, n]``: eigenvectors (columns, eigenvalues descending) of a symmetric ``covariance [n, n]``.

    ``eigh`` in float64; if ``K Kᵀ`` is not the identity to ``ORTHOGONALITY_TOL`` the columns are
    re-orthonormalised (QR, the official code's Gram–Schmidt fallback).
    """
    cov = np.asarray(covariance, np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"klt_basis: covariance must be square [n, n], got shape {cov.shape}.")
    _, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
    k = vecs[:, ::-1]
    if np.max(np.abs(k @ k.T - np.eye(len(k)))) > ORTHOGONALITY_TOL:
        q, r = np.linalg.qr(k)
        k = q * np.where(np.diagonal(r) >= 0, 1.0, -1.0)[None, :]
    return k


def random_hadamard_rotation(n: int, key: jax.Array, where: str) -> np.ndarray:
    """``diag(ε) H_n / √n`` in float64 (``ε`` random signs from ``key``); an error naming ``where`` if ``n`` has no
    Hadamard construction."""
    if not supported_size(n):
        raise ValueError(f"{where}: width {n} has no Hadamard construction (the next supported size is "
                         f"{pad_to_hadamard_size(n)}, which would change the width).")
    return np.asarray(jax.random.rademacher(key, (n,)), np.float64)[:, None] * hadamard_numpy(n)


def klt_rotation(covariance: np.ndarray, hadamard: np.ndarray) -> np.ndarray:
    """``R = K H [n, n]`` (module docstring) for the activations' ``covariance`` and an orthonormal ``hadamard``."""
    k = klt_basis(covariance)
    if np.shape(hadamard) != k.shape:
        raise ValueError(f"klt_rotation: hadamard must be {k.shape}, got {np.shape(hadamard)}.")
    return k @ np.asarray(hadamard, np.float64)
