"""W8A8 through XLA's own low-precision GEMMs (cuBLASLt int8 IMMA / fp8), no Pallas.

The activation is quantized per token by one fused XLA pass; the product is a
``lax.dot_general`` of the int8 (or E4M3) codes with ``preferred_element_type`` int32
(float32 for fp8), which XLA lowers to cuBLASLt on GPUs that have those tensor cores;
the scales are applied in a fused epilogue::

    y[m, n] = s_x[m] * s_w[n] * sum_k c_x[m, k] * c_w[k, n]

It is the baseline the Pallas int8/fp8 kernels must beat, and a dispatch target in its
own right where it is faster. Only per-channel symmetric 8-bit weights apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import FP8Format, IntFormat, QArray, quantize

from . import fp8_matmul, int8_activation_matmul
from ._common import TileConfig, check_activation

NAME = "xla-native-lowp-dot"


def supports(w: QArray, activation) -> bool:
    fmt = w.format
    if not (isinstance(w, QArray) and len(w.shape) == 2 and w.axis == 0
            and getattr(fmt, "granularity", None) == "channel"):
        return False
    if isinstance(fmt, IntFormat):
        return fmt.bits == 8 and fmt.symmetric and int8_activation_matmul.supports_activation(activation)
    return isinstance(fmt, FP8Format) and fp8_matmul.supports(w, activation)


def reference(x: jax.Array, w: QArray, activation) -> jax.Array:
    if isinstance(w.format, IntFormat):
        return int8_activation_matmul.reference(x, w, activation)
    return fp8_matmul.reference(x, w, activation)


def check(x: jax.Array, w: QArray, activation, cfg: TileConfig | None = None) -> None:
    if not supports(w, activation):
        raise ValueError(f"{NAME}: needs per-channel symmetric int8 or E4M3 weights [K, N] along axis 0 with "
                         f"matching per-token activations; got {w.format.name} / "
                         f"{getattr(activation, 'name', activation)!r}.")
    check_activation(x, w.shape[0], NAME)


def native_lowp_dot(x: jax.Array, w: QArray, activation, cfg: TileConfig | None = None) -> jax.Array:
    """``fake_quant(x [M, K]) @ dequantize(w [K, N])`` via XLA's int8/fp8 GEMM (module docstring)."""
    check(x, w, activation)
    return _call(x, w.codes, w.scales, activation=activation)


def _call_impl(x, codes, scales, *, activation):
    xq = quantize(x, activation, axis=-1)
    acc_dtype = jnp.int32 if isinstance(activation, IntFormat) else jnp.float32
    acc = jax.lax.dot_general(xq.codes, codes, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype)
    y = acc.astype(jnp.float32) * xq.scales.astype(jnp.float32) * scales.astype(jnp.float32)
    return y.astype(x.dtype)


_call = jax.jit(_call_impl, static_argnames=("activation",))
