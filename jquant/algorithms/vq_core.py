"""Vector quantization with GPTQ-style error feedback over blocks of ``d`` rows (BlockLDLQ / GPTVQ).

Paper maths only. Layout as ``gptq_core``: ``W [in, out]``, ``H = XᵀX [in, in]``, ``U`` the upper
Cholesky factor of the damped ``H⁻¹`` (``UᵀU = H⁻¹``). A vector is ``d`` consecutive rows of one
output column, so rows are quantized ``d`` at a time (block ``B``, the rows after it ``R``).
Fixing ``W_B`` to ``Q_B`` and re-solving the remaining rows for the least output error gives
(the block form of GPTQ's Eq. 3; QuIP#'s BlockLDLQ, GPTVQ §3.2)::

    W_R ← W_R − U_{B,R}ᵀ U_{B,B}⁻ᵀ (W_B − Q_B)

and the output error caused by one column's vector ``w_B`` rounded to ``c`` is
``‖U_{B,B}⁻ᵀ (w_B − c)‖²``, so the Hessian-aware assignment is a Euclidean nearest-codeword
search after mapping vectors and codewords by ``T = U_{B,B}⁻ᵀ`` (``d × d``, lower triangular).
With ``d = 1`` both reduce to GPTQ.

``feedback_sweep`` runs this for ``n_blocks`` blocks from row ``row0`` with a caller-supplied
block quantizer ``round_block(rows [d, out], T [d, d], params) -> (q_rows [d, out], idx [out, c])``
(``params``: any pytree; ``idx``: the codes to store, ``c`` ints per vector).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

RoundBlock = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, jax.Array]]


def block_metric(u_bb: jax.Array) -> jax.Array:
    """``T = U_BB⁻ᵀ`` for the diagonal block ``u_bb [d, d]`` (upper triangular)."""
    eye = jnp.eye(u_bb.shape[0], dtype=u_bb.dtype)
    return jax.scipy.linalg.solve_triangular(u_bb, eye, lower=False).T


@functools.partial(jax.jit, static_argnames=("round_block", "d", "n_blocks", "n_idx"))
def feedback_sweep(w: jax.Array, u: jax.Array, row0: jax.Array, params, *, round_block: RoundBlock, d: int,
                   n_blocks: int, n_idx: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize rows ``[row0, row0 + n_blocks·d)`` of ``w [in, out]`` block by block with error feedback.

    Returns ``(w, q, idx)``: ``w`` with the feedback applied to every later row (rows after the
    range included, so a caller can continue with the next range), ``q [n_blocks·d, out]`` the
    quantized rows and ``idx [n_blocks, out, n_idx]`` int32 the block quantizer's codes.
    """
    n_in, n_out = w.shape

    def body(b, carry):
        w, q_all, idx_all = carry
        i = b * d + jnp.asarray(row0).astype(b.dtype)  # the loop index's int type (int64 under x64)
        rows = jax.lax.dynamic_slice(w, (i, 0), (d, n_out))
        u_rows = jax.lax.dynamic_slice(u, (i, 0), (d, n_in))  # U[B, :]
        u_bb = jax.lax.dynamic_slice(u_rows, (0, i), (d, d))
        t = block_metric(u_bb)
        q, idx = round_block(rows, t, params)
        err = t @ (rows - q)  # U_BB^-T (W_B - Q_B)
        later = (jnp.arange(n_in) >= i + d)[:, None]
        w = w - jnp.where(later, u_rows.T @ err, 0.0)
        q_all = jax.lax.dynamic_update_slice(q_all, q.astype(q_all.dtype), (b * d, 0))
        idx_all = jax.lax.dynamic_update_slice(idx_all, idx[None].astype(jnp.int32), (b, 0, 0))
        return w, q_all, idx_all

    init = (w, jnp.zeros((n_blocks * d, n_out), w.dtype), jnp.zeros((n_blocks, n_out, n_idx), jnp.int32))
    return jax.lax.fori_loop(0, n_blocks, body, init)
