"""Block error feedback (BlockLDLQ / GPTVQ sweep) against a float64 numpy OBS reference."""

import jax.numpy as jnp
import numpy as np

from jquant.algorithms.gptq_core import damped_factor, prepare_hessian
from jquant.algorithms.gptvq import round_to_codebooks
from jquant.algorithms.vq_core import feedback_sweep


def _problem(seed, n=24, m=5, d=2, k=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, n)) @ (np.eye(n) + 0.5 * rng.standard_normal((n, n)))
    return rng.standard_normal((n, m)), x.T @ x / 200, rng.standard_normal((k, d))


def _reference(w, h, book, d):
    """Rows quantized d at a time; the rest re-solved with the explicit inverse Hessian (Schur updates).

    Assignment: argmin_c (w_B - c)ᵀ [H⁻¹]_BB⁻¹ (w_B - c), the output error of fixing block B.
    """
    hinv = np.linalg.inv(h)
    w = w.copy()
    n = len(w)
    q = np.zeros_like(w)
    idx = np.zeros((n // d, w.shape[1]), int)
    for b in range(n // d):
        B, R = slice(b * d, b * d + d), slice(b * d + d, n)
        metric = np.linalg.inv(hinv[B, B])
        for j in range(w.shape[1]):
            e = w[B, j][None] - book
            idx[b, j] = np.argmin(np.einsum("kd,de,ke->k", e, metric, e))
            q[B, j] = book[idx[b, j]]
        err = w[B] - q[B]
        w[R] -= hinv[R, B] @ metric @ err
        hinv[R, R] -= hinv[R, B] @ metric @ hinv[B, R]
    return q, idx


def test_feedback_sweep_matches_the_explicit_inverse_hessian_reference(x64):
    for seed, d in ((0, 2), (1, 4), (2, 1)):
        w, h, book = _problem(seed, d=d)
        h_damped, w0 = prepare_hessian(jnp.asarray(h), jnp.asarray(w), 0.01)
        q_ref, idx_ref = _reference(np.asarray(w0), np.asarray(h_damped), book, d)
        _, _, u, _ = damped_factor(jnp.asarray(h), jnp.asarray(w), 0.01)
        params = (jnp.asarray(book)[None], jnp.zeros(w.shape[1], jnp.int32))
        _, q, idx = feedback_sweep(w0, u, jnp.int32(0), params, round_block=round_to_codebooks, d=d, n_blocks=len(w) // d,
                                   n_idx=1)
        np.testing.assert_array_equal(np.asarray(idx)[..., 0], idx_ref)
        np.testing.assert_allclose(np.asarray(q), q_ref, rtol=0, atol=1e-12)


def test_sweep_in_two_ranges_equals_one_sweep(x64):
    w, h, book = _problem(3, n=16, d=2)
    _, w0, u, _ = damped_factor(jnp.asarray(h), jnp.asarray(w), 0.01)
    params = (jnp.asarray(book)[None], jnp.zeros(w.shape[1], jnp.int32))
    kw = dict(round_block=round_to_codebooks, d=2, n_idx=1)
    _, q_all, _ = feedback_sweep(w0, u, jnp.int32(0), params, n_blocks=8, **kw)
    w1, q1, _ = feedback_sweep(w0, u, jnp.int32(0), params, n_blocks=3, **kw)
    _, q2, _ = feedback_sweep(w1, u, jnp.int32(6), params, n_blocks=5, **kw)
    np.testing.assert_allclose(np.concatenate([q1, q2]), np.asarray(q_all), atol=1e-12)
