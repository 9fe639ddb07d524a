"""The LoRA linear with a frozen base weight and a choice of GEMM arithmetic (GSQ-Tuning §3.2).

For ``x [N, in]``, frozen base ``W0 [in, out]`` (an array or a ``QArray`` such as NF4),
adapters ``A [in, r]``, ``B [r, out]`` and ``s = alpha / r``::

    forward   H  = Q(x) Q(A)                      (reduction over in)
              y  = Q(x) Q(W0) + s Q(H) Q(B)       (over in, over r)
    backward  dB = s Q(H)^T Q(dy)                 (over tokens N)
              dH = s Q(dy) Q(B)^T                 (over out)
              dA = Q(x)^T Q(dH)                   (over tokens N)
              dx = Q(dy) Q(W0)^T + Q(dH) Q(A)^T   (over out, over r)

Every ``Q`` quantizes its operand along that GEMM's reduction axis with
``LoRAArithmetic.operands`` (so ``x`` is grouped along ``in`` forward and along the
tokens for ``dA``); with ``operands=None`` there is no quantization and the GEMMs run
in ``compute_dtype`` with float32 accumulation (16-bit LoRA / QLoRA). The backward pass
is written by hand (``jax.custom_vjp``) so that the seven GEMMs are exactly these; the
base weight is frozen (its cotangent is zero by construction) and is dequantized again
in the backward pass rather than kept. ``saved="quantized"`` keeps ``Q(x)`` and ``Q(H)``
in their packed format for the backward pass (the memory-saving option of spec §7.2:
``x`` grouped along ``in`` is dequantized and re-grouped along the tokens for ``dA``);
``saved="float"`` keeps ``x`` and ``H`` as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jquant.formats import Format, GSEFormat, QArray, dequantize, quantize
from jquant.ops.quantized_gemm import ACCUMULATIONS, quantized_matmul

SAVED = ("float", "quantized")
ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAArithmetic:
    """How the GEMMs of a LoRA linear compute.

    Attributes:
      operands: the format every GEMM operand is quantized to along its reduction axis
        (e.g. ``GSEFormat(bits=8)``); None: no quantization, GEMMs in ``compute_dtype``.
      gradient_rounding: rounding of the gradient operands ``dy`` and ``dH`` in the
        backward GEMMs (everything else rounds to nearest); "stochastic" needs a key.
      accumulate: "int32" (exact integer group sums, GSE only; slow on CPU) or
        "float32" (dequantized operands; equal up to float32 summation order).
      saved: "float" or "quantized" (what is kept for the backward pass).
      compute_dtype: operand dtype of the unquantized GEMMs (operands=None).
    """

    operands: Format | None = None
    gradient_rounding: Literal["nearest", "stochastic"] = "nearest"
    accumulate: Literal["int32", "float32"] = "float32"
    saved: Literal["float", "quantized"] = "float"
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        own = "LoRAArithmetic"
        if self.operands is not None and not isinstance(self.operands, Format):
            raise TypeError(f"{own}: operands must be a jquant Format or None, got {self.operands!r}.")
        if self.gradient_rounding not in ROUNDINGS:
            raise ValueError(f"{own}: gradient_rounding={self.gradient_rounding!r} is not one of {ROUNDINGS}.")
        if self.accumulate not in ACCUMULATIONS:
            raise ValueError(f"{own}: accumulate={self.accumulate!r} is not one of {ACCUMULATIONS}.")
        if self.saved not in SAVED:
            raise ValueError(f"{own}: saved={self.saved!r} is not one of {SAVED}.")
        if self.operands is None and (self.saved != "float" or self.gradient_rounding != "nearest"
                                      or self.accumulate != "float32"):
            raise ValueError(f"{own}: saved/gradient_rounding/accumulate only apply with an operand format; "
                             "set operands (e.g. GSEFormat(bits=8)).")
        if self.accumulate == "int32" and not isinstance(self.operands, GSEFormat):
            raise ValueError(f"{own}: accumulate='int32' needs GSEFormat operands, got {self.operands}.")
        if getattr(self.operands, "rounding", "nearest") != "nearest":
            raise ValueError(f"{own}: give operands with rounding='nearest' and set gradient_rounding instead.")
        jnp.dtype(self.compute_dtype)

    @property
    def name(self) -> str:
        if self.operands is None:
            return jnp.dtype(self.compute_dtype).name
        name = self.operands.name
        if self.gradient_rounding == "stochastic":
            name += "-sr"
        return name + ("-savedq" if self.saved == "quantized" else "")

    @property
    def needs_key(self) -> bool:
        return self.gradient_rounding == "stochastic"


def _matmul(p: jax.Array, r: jax.Array, arith: LoRAArithmetic, key_p: jax.Array | None = None) -> jax.Array:
    """``p [M, K] @ r [K, N]`` in float32 under ``arith``; with ``key_p``, ``p`` rounds stochastically."""
    if arith.operands is None:
        dt = jnp.dtype(arith.compute_dtype)
        return jnp.dot(p.astype(dt), r.astype(dt), precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
    return quantized_matmul(p, r, arith.operands, accumulate=arith.accumulate, key_p=key_p)


def _base(w0: jax.Array | QArray) -> jax.Array:
    return dequantize(w0, jnp.float32) if isinstance(w0, QArray) else w0.astype(jnp.float32)


def _save(v: jax.Array, arith: LoRAArithmetic) -> jax.Array | QArray:
    """What the backward pass keeps of an operand grouped along its last axis."""
    return quantize(v, arith.operands, axis=-1) if arith.saved == "quantized" else v


def _restore(v: jax.Array | QArray) -> jax.Array:
    return dequantize(v, jnp.float32) if isinstance(v, QArray) else v.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lora_2d(x, w0, a, b, key, scale: float, arith: LoRAArithmetic):
    return _lora_fwd(x, w0, a, b, key, scale, arith)[0]


def _lora_fwd(x, w0, a, b, key, scale, arith):
    h = _matmul(x, a, arith)
    y = _matmul(x, _base(w0), arith) + scale * _matmul(h, b, arith)
    return y.astype(x.dtype), (_save(x, arith), _save(h.astype(x.dtype), arith), w0, a, b, key)


def _lora_bwd(scale, arith, res, dy):
    x_saved, h_saved, w0, a, b, key = res
    x, h, dy = _restore(x_saved), _restore(h_saved), dy.astype(jnp.float32)
    k = list(jax.random.split(key, 5)) if arith.needs_key else [None] * 5  # dy x3, dH x2
    db = scale * _matmul(dy.T, h, arith, k[0]).T                   # [r, out]: reduction over N
    dh = scale * _matmul(dy, b.astype(jnp.float32).T, arith, k[1])  # [N, r]: over out
    da = _matmul(dh.T, x, arith, k[2]).T                            # [in, r]: over N
    dx = _matmul(dy, _base(w0).T, arith, k[3]) + _matmul(dh, a.astype(jnp.float32).T, arith, k[4])
    x_dtype = jnp.dtype(x_saved.dtype)
    return dx.astype(x_dtype), jax.tree.map(lambda _: None, w0), da.astype(a.dtype), db.astype(b.dtype), None


_lora_2d.defvjp(_lora_fwd, _lora_bwd)


def lora_linear(x: jax.Array, w0: jax.Array | QArray, a: jax.Array, b: jax.Array, *, scale: float,
                arithmetic: LoRAArithmetic, bias: jax.Array | None = None,
                key: jax.Array | None = None) -> jax.Array:
    """``y = x W0 + scale (x A) B + bias`` for ``x [..., in]``, under ``arithmetic`` (see module doc).

    Args:
      x: activations ``[..., in]``.
      w0: frozen base weight ``[in, out]`` (array or ``QArray``); receives no gradient.
      a, b: adapters ``[in, r]`` and ``[r, out]``.
      scale: ``alpha / r``.
      arithmetic: the GEMM arithmetic.
      bias: optional frozen bias ``[out]``.
      key: PRNG key, required iff ``arithmetic.gradient_rounding == "stochastic"``.

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    if arithmetic.needs_key and key is None:
        raise ValueError("lora_linear: gradient_rounding='stochastic' needs a PRNG key (key=...).")
    if not arithmetic.needs_key and key is not None:
        raise ValueError("lora_linear: a key was given but the arithmetic rounds to nearest; drop the key.")
    shape_w = tuple(w0.shape)
    if x.shape[-1] != shape_w[0] or a.shape != (shape_w[0], a.shape[1]) or b.shape != (a.shape[1], shape_w[1]):
        raise ValueError(f"lora_linear: shapes do not chain: x {x.shape}, w0 {shape_w} (expected [in, out]), "
                         f"a {a.shape} (expected [in, r]), b {b.shape} (expected [r, out]).")
    lead = x.shape[:-1]
    key = jax.random.key(0) if key is None else key
    y = _lora_2d(x.reshape(-1, x.shape[-1]), w0, a, b, key, float(scale), arithmetic)
    y = y.reshape(*lead, shape_w[1])
    return y if bias is None else y + jax.lax.stop_gradient(bias).astype(y.dtype)
