"""Quantize-compute-dequantize GEMMs (GSQ-Tuning spec §3.2-3.3): ``C = Q(P) @ Q(R)``.

Both operands are quantized along the GEMM's reduction axis K. With a ``GSEFormat``
and ``accumulate="int32"`` the product is computed the way integer hardware does it
(spec §3.3)::

    C[m, n] = sum_g 2^(E_P[m, g] + E_R[g, n] - 2(b-2)) * sum_{k in g} m_P[m, k] m_R[k, n]

with an exact int8 x int8 -> int32 product inside each group of G and the
power-of-two rescale and cross-group sum in float32 (hardware shifts into a wide
integer accumulator; float32 rounds only that outer sum). ``accumulate="float32"``
multiplies the dequantized operands in float32 instead: every product
``m_P m_R 2^(...)`` is exact there too, so the two differ only in float32
accumulation order. Other formats (e.g. per-tensor int8, the "no shared exponent"
ablation) use the float32 path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import Format, GSEFormat, dequantize, quantize
from jquant.formats.minifloat import ldexp

ACCUMULATIONS = ("int32", "float32")


def quantized_values(x: jax.Array, fmt: Format, axis: int, key: jax.Array | None = None) -> jax.Array:
    """``dequantize(quantize(x, fmt, axis))`` in float32 (GSE skips the packing)."""
    if isinstance(fmt, GSEFormat):
        return fmt.fake_values(x, axis % x.ndim, key)
    return dequantize(quantize(x, fmt, axis=axis, key=key), jnp.float32)


def _rounded(fmt: Format, key: jax.Array | None) -> Format:
    """``fmt`` with stochastic rounding when a key is given."""
    return fmt if key is None else dataclasses.replace(fmt, rounding="stochastic")


def _gse_int32_matmul(p: jax.Array, r: jax.Array, fmt: GSEFormat,
                      key_p: jax.Array | None, key_r: jax.Array | None) -> jax.Array:
    mp, ep, _, _ = _rounded(fmt, key_p).mantissas(p, 1, key_p)  # [M, Kp], [M, ng]
    mr, er, _, _ = _rounded(fmt, key_r).mantissas(r, 0, key_r)  # [Kp, N], [ng, N]
    ng, g = ep.shape[1], fmt.group_size
    inner = jax.lax.dot_general(  # mantissas fit int8 (b <= 8)
        mp.astype(jnp.int8).reshape(p.shape[0], ng, g), mr.astype(jnp.int8).reshape(ng, g, r.shape[1]),
        (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # [ng, M, N], exact
    shift = ep.T[:, :, None] + er[:, None, :] - 2 * (fmt.bits - 2)
    return jnp.sum(ldexp(inner.astype(jnp.float32), shift), axis=0)


def quantized_matmul(p: jax.Array, r: jax.Array, fmt: Format, *, accumulate: str = "int32",
                     key_p: jax.Array | None = None, key_r: jax.Array | None = None) -> jax.Array:
    """``Q(p) @ Q(r)`` for ``p [M, K]``, ``r [K, N]``, each quantized along K; float32 ``[M, N]``.

    ``key_p`` / ``key_r``: round that operand stochastically (``fmt`` itself rounds to nearest).
    """
    if accumulate not in ACCUMULATIONS:
        raise ValueError(f"quantized_matmul: accumulate={accumulate!r} is not one of {ACCUMULATIONS}.")
    if p.ndim != 2 or r.ndim != 2 or p.shape[1] != r.shape[0]:
        raise ValueError(f"quantized_matmul: expected p [M, K] and r [K, N], got {p.shape} and {r.shape}.")
    if accumulate == "int32":
        if not isinstance(fmt, GSEFormat):
            raise ValueError(f"quantized_matmul: accumulate='int32' needs a GSEFormat, got {fmt.name}; "
                             "use accumulate='float32'.")
        return _gse_int32_matmul(p, r, fmt, key_p, key_r)
    return jnp.dot(quantized_values(p, _rounded(fmt, key_p), 1, key_p),
                   quantized_values(r, _rounded(fmt, key_r), 0, key_r),
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
