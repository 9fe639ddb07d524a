"""The FP8 fine-tuning baseline of GSQ-Tuning (spec §4 "FP8 (E4M3/E5M2) quantized fine-tuning", target 4).

A sibling of the per-tensor INT8 ablation (``LoRAArithmetic(operands=IntFormat(bits=8,
granularity="tensor"))``) with the common FP8 training recipe: every GEMM operand of
the adapted linear is cast to FP8 with **one scale per tensor**, E4M3 for the
forward tensors (activations ``x``, ``H`` and the weights ``W0``, ``A``, ``B``) and
E5M2 for the gradient operands ``dy`` and ``dH`` of the backward GEMMs (whose other
operand stays E4M3). For ``x [N, in]``, ``W0 [in, out]``, ``A [in, r]``, ``B [r, out]``
and ``s = alpha / r``, with ``Q4`` / ``Q5`` the per-tensor E4M3 / E5M2 casts::

    forward   H  = Q4(x) Q4(A)                       [N, r]
              y  = Q4(x) Q4(W0) + s Q4(H) Q4(B)      [N, out]
    backward  dB = s Q5(dy)^T Q4(H)                  [out, r] (stored transposed, [r, out])
              dH = s Q5(dy) Q4(B)^T                  [N, r]
              dA = Q5(dH)^T Q4(x)                    [r, in]  (stored transposed, [in, r])
              dx = Q5(dy) Q4(W0)^T + Q5(dH) Q4(A)^T  [N, in]

    Q(v) = (c, t):  t = amax(|v|) / max_normal,  c = fp8_RNE(clip(v / t, ±max_normal))
    Q(P) Q(R) = (c_P @ c_R) · (t_P t_R)

with max_normal = 448 (E4M3) or 57344 (E5M2) and ``fp8_RNE`` the saturating
round-to-nearest-even of ``FP8Format`` (an all-zero tensor has t = 0 and codes 0).
Each code product is exact in float32 (at most 4 x 4 significant bits) and is summed
in float32; the rescale by ``t_P t_R`` follows, as in an FP8 GEMM with per-tensor
scales (cuBLASLt's ``scale_a · scale_b``; Hopper's FP8 tensor cores accumulate with
fewer than float32's bits, which this emulation does not model). The scales are
"current" scaling, from each tensor's own amax, not a delayed amax history. A
per-tensor cast does not depend on the axis, so ``Q(v^T) = Q(v)^T`` and one cast of
``x``, ``H``, ``dy`` and ``dH`` serves every GEMM that reads it.

``saved="quantized"`` keeps ``Q4(x)`` and ``Q4(H)`` (float8 codes, 1 byte per element,
plus one float32 scale each) as the backward pass's residuals, the very casts the
forward GEMMs used; ``saved="float"`` keeps ``x`` and ``H`` (``H`` in ``x``'s dtype) and
casts them again (the same codes, except where ``H`` rounded to a 16-bit ``x`` dtype
casts differently). The frozen base weight is
dequantized and cast again in the backward pass rather than kept, as in
``jquant.ops.lora_linear``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jquant.formats import FP8Format, QArray, dequantize, quantize
from jquant.ops.lora import LoRAArithmetic

E4M3_TENSOR = FP8Format(element="e4m3", granularity="tensor")
E5M2_TENSOR = FP8Format(element="e5m2", granularity="tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Arithmetic(LoRAArithmetic):
    """Per-tensor scaled FP8 GEMMs: ``operands`` for the forward tensors, ``gradient_operands`` for ``dy``, ``dH``.

    Attributes:
      operands: the format of ``x``, ``H``, ``W0``, ``A`` and ``B`` in every GEMM
        (default E4M3, one scale per tensor).
      gradient_operands: the format of the gradients ``dy`` and ``dH`` in the backward
        GEMMs (default E5M2, one scale per tensor).
      saved: "float" or "quantized" (what is kept of ``x`` and ``H`` for the backward pass).

    ``accumulate`` is "float32" and ``gradient_rounding`` "nearest" (FP8 casts round to
    nearest even); ``compute_dtype`` is unused.
    """

    operands: FP8Format = E4M3_TENSOR
    gradient_operands: FP8Format = E5M2_TENSOR

    def __post_init__(self):
        super().__post_init__()
        own = "FP8Arithmetic"
        for what, fmt in (("operands", self.operands), ("gradient_operands", self.gradient_operands)):
            if not isinstance(fmt, FP8Format) or fmt.granularity != "tensor":
                raise ValueError(f"{own}: {what} must be a per-tensor FP8Format (e.g. FP8Format(element='e4m3', "
                                 f"granularity='tensor')), got {fmt!r}; other formats go through LoRAArithmetic.")
        if self.gradient_rounding != "nearest":
            raise ValueError(f"{own}: gradient_rounding={self.gradient_rounding!r}: FP8 casts round to nearest even "
                             "only.")

    @property
    def name(self) -> str:
        grad = self.gradient_operands.name.removeprefix("fp8-")
        return f"{self.operands.name}/{grad}" + ("-savedq" if self.saved == "quantized" else "")


def _cast(v: jax.Array | QArray, fmt: FP8Format) -> QArray:
    """``Q(v)`` of a 2-D ``v`` (a ``QArray`` already in ``fmt`` is kept as it is)."""
    if isinstance(v, QArray) and v.format == fmt:
        return v
    return quantize(v, fmt, axis=-1)


def _gemm(p: QArray, r: QArray, transpose_p: bool = False, transpose_r: bool = False) -> jax.Array:
    """``Q(P) Q(R) = (c_P @ c_R) · (t_P t_R)`` in float32 for per-tensor FP8 ``p [M, K]`` and ``r [K, N]``
    (stored transposed where ``transpose_*``: a per-tensor cast of ``v^T`` is the cast of ``v`` transposed)."""
    cp, cr = p.codes.astype(jnp.float32), r.codes.astype(jnp.float32)
    cp, cr = (cp.T if transpose_p else cp), (cr.T if transpose_r else cr)
    scale = p.scales.astype(jnp.float32).reshape(()) * r.scales.astype(jnp.float32).reshape(())
    return jnp.dot(cp, cr, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32) * scale


def _base(w0: jax.Array | QArray) -> jax.Array:
    return dequantize(w0, jnp.float32) if isinstance(w0, QArray) else w0.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fp8_lora_2d(x, w0, a, b, scale: float, arith: FP8Arithmetic):
    return _fp8_lora_fwd(x, w0, a, b, scale, arith)[0]


def _fp8_lora_fwd(x, w0, a, b, scale, arith):
    f = arith.operands
    xq = _cast(x, f)
    h = _gemm(xq, _cast(a, f))                                            # [N, r]
    hq = _cast(h, f)
    y = _gemm(xq, _cast(_base(w0), f)) + scale * _gemm(hq, _cast(b, f))  # [N, out]
    saved = (xq, hq) if arith.saved == "quantized" else (x, h.astype(x.dtype))
    return y.astype(x.dtype), (*saved, w0, a, b)


def _fp8_lora_bwd(scale, arith, res, dy):
    x_saved, h_saved, w0, a, b = res
    f, g = arith.operands, arith.gradient_operands
    xq, hq = _cast(x_saved, f), _cast(h_saved, f)
    dyq = _cast(dy.astype(jnp.float32), g)
    db = scale * _gemm(dyq, hq, transpose_p=True).T                             # [r, out]: reduction over N
    dh = scale * _gemm(dyq, _cast(b.astype(jnp.float32), f), transpose_r=True)  # [N, r]: over out
    dhq = _cast(dh, g)
    da = _gemm(dhq, xq, transpose_p=True).T                                     # [in, r]: over N
    dx = (_gemm(dyq, _cast(_base(w0), f), transpose_r=True)                     # [N, in]: over out
          + _gemm(dhq, _cast(a.astype(jnp.float32), f), transpose_r=True))      # and over r
    x_dtype = jnp.dtype(x_saved.dtype)
    return dx.astype(x_dtype), jax.tree.map(lambda _: None, w0), da.astype(a.dtype), db.astype(b.dtype)


_fp8_lora_2d.defvjp(_fp8_lora_fwd, _fp8_lora_bwd)


def fp8_lora_linear(x: jax.Array, w0: jax.Array | QArray, a: jax.Array, b: jax.Array, *, scale: float,
                    arithmetic: FP8Arithmetic, bias: jax.Array | None = None,
                    key: jax.Array | None = None) -> jax.Array:
    """``y = x W0 + scale (x A) B + bias`` for ``x [..., in]`` with per-tensor FP8 GEMMs (see module doc).

    Args:
      x: activations ``[..., in]``.
      w0: frozen base weight ``[in, out]`` (array or ``QArray``); receives no gradient.
      a, b: adapters ``[in, r]`` and ``[r, out]``.
      scale: ``alpha / r``.
      arithmetic: the ``FP8Arithmetic``.
      bias: optional frozen bias ``[out]``.
      key: must be None (FP8 casts round to nearest); accepted for ``lora_linear``'s signature.

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    if not isinstance(arithmetic, FP8Arithmetic):
        raise TypeError(f"fp8_lora_linear: arithmetic must be an FP8Arithmetic, got {arithmetic!r}; other "
                        "arithmetics go through jquant.ops.lora_linear.")
    if key is not None:
        raise ValueError("fp8_lora_linear: a key was given but FP8 casts round to nearest; drop the key.")
    shape_w = tuple(w0.shape)
    if x.shape[-1] != shape_w[0] or a.shape != (shape_w[0], a.shape[1]) or b.shape != (a.shape[1], shape_w[1]):
        raise ValueError(f"fp8_lora_linear: shapes do not chain: x {x.shape}, w0 {shape_w} (expected [in, out]), "
                         f"a {a.shape} (expected [in, r]), b {b.shape} (expected [r, out]).")
    lead = x.shape[:-1]
    y = _fp8_lora_2d(x.reshape(-1, x.shape[-1]), w0, a, b, float(scale), arithmetic)
    y = y.reshape(*lead, shape_w[1])
    return y if bias is None else y + jax.lax.stop_gradient(bias).astype(y.dtype)
