"""The FP8 LoRA linear (per-tensor E4M3 forward / E5M2 gradients) against a pure-jnp reference, the E4M3 rounding
step, its all-E4M3 sibling in jquant.ops, and the memory accounting of its saved activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora_linear import (
    _inputs,  # the sibling test's random x, W0, A, B and loss probe (same folder on sys.path)
)

from jquant.finetune import FP8Arithmetic, fp8_lora_linear
from jquant.finetune.memory import saved_residual_bytes
from jquant.formats import FP8Format, IntFormat, dequantize, quantize
from jquant.ops import LoRAArithmetic, lora_linear

S = 0.25
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
HIGHEST = jax.lax.Precision.HIGHEST


def _grads(fn, arith, x, w0, a, b, probe):
    def loss(x, a, b, w0, probe):
        return jnp.sum(fn(x, w0, a, b, scale=S, arithmetic=arith) * probe)
    return jax.jit(jax.grad(loss, (0, 1, 2)))(x, a, b, w0, probe)


def _cast(v, dtype):
    """Per-tensor scaled float8: ``(codes, t)`` with ``t = amax / max`` and ``codes = fp8(clip(v / t))``."""
    v = jnp.asarray(v, jnp.float32)
    top = float(jnp.finfo(dtype).max)
    t = jnp.max(jnp.abs(v)) / top
    return jnp.clip(v / jnp.where(t > 0, t, 1.0), -top, top).astype(dtype), t


def _mm(p, r):
    """Codes multiplied in float32, then rescaled by both tensor scales."""
    (cp, tp), (cr, tr) = p, r
    return jnp.dot(cp.astype(jnp.float32), cr.astype(jnp.float32), precision=HIGHEST) * (tp * tr)


def _reference(x, w0, a, b, dy):
    """The FP8 recipe's seven GEMMs: E4M3 for x, H, W0, A, B and E5M2 for dy, dH, each cast on its own."""
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    h = _mm(_cast(x, E4M3), _cast(a, E4M3))
    y = _mm(_cast(x, E4M3), _cast(w0, E4M3)) + S * _mm(_cast(h, E4M3), _cast(b, E4M3))
    db = S * _mm(_cast(dy.T, E5M2), _cast(h, E4M3))
    dh = S * _mm(_cast(dy, E5M2), _cast(b.T, E4M3))
    da = _mm(_cast(dh.T, E5M2), _cast(x, E4M3))
    dx = _mm(_cast(dy, E5M2), _cast(w0.T, E4M3)) + _mm(_cast(dh, E5M2), _cast(a.T, E4M3))
    return y, dx, da.T, db.T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("saved", ["float", "quantized"])
@pytest.mark.parametrize("base", ["float", "nf4"])
def test_fp8_gemms_equal_the_reference(seed, saved, base):
    x, w0, a, b, dy = _inputs(10 + seed)
    w = quantize(w0, "nf4", axis=0) if base == "nf4" else w0
    dense = dequantize(w, jnp.float32) if base == "nf4" else w0
    arith = FP8Arithmetic(saved=saved)
    y = fp8_lora_linear(x, w, a, b, scale=S, arithmetic=arith)
    dx, da, db = _grads(fp8_lora_linear, arith, x, w, a, b, dy)
    for got, want in zip((y, dx, da, db), _reference(x, dense, a, b, dy)):
        got, want = np.asarray(got).reshape(want.shape), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # float32 summation order


def test_forward_is_the_all_e4m3_sibling_and_gradients_are_e5m2():
    """The forward equals jquant.ops' generic per-tensor path with E4M3 operands; so do the gradients when the
    gradient operands are E4M3 too, and they do not with the recipe's E5M2."""
    x, w0, a, b, dy = _inputs(3)
    e4m3 = FP8Format(element="e4m3", granularity="tensor")
    generic = LoRAArithmetic(operands=e4m3, saved="quantized", compute_dtype="float32")
    recipe, all_e4m3 = FP8Arithmetic(saved="quantized"), FP8Arithmetic(gradient_operands=e4m3, saved="quantized")
    want = lora_linear(x, w0, a, b, scale=S, arithmetic=generic)
    tol = {"rtol": 1e-5, "atol": 1e-5 * float(jnp.abs(want).max())}
    np.testing.assert_allclose(np.asarray(fp8_lora_linear(x, w0, a, b, scale=S, arithmetic=recipe)), want, **tol)
    ref = _grads(lora_linear, generic, x, w0, a, b, dy)
    for got, want in zip(_grads(fp8_lora_linear, all_e4m3, x, w0, a, b, dy), ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    for got, want in zip(_grads(fp8_lora_linear, recipe, x, w0, a, b, dy), ref):
        assert not np.allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))


def _rounding_rms(mbits: int) -> float:
    """Relative RMS error of rounding to a float grid with ``mbits`` mantissa bits: the relative step 2^-mbits
    (E4M3: 2^-3) over sqrt(12) (a uniform error over one step), times sqrt(E[1/M^2]) for mantissas M in [1, 2)
    weighted by x^2 under a log-uniform M (= sqrt(ln 2 / 1.5))."""
    return 2.0 ** -mbits / np.sqrt(12) * np.sqrt(np.log(2) / 1.5)


def test_fp8_error_is_the_format_step():
    """Against full precision, each GEMM output's relative RMS error is the root-sum-square of its operands' FP8
    rounding errors (E4M3: 3 mantissa bits, E5M2: 2), far above float32 rounding and within 25 % of the prediction,
    which separates the E5M2 gradient operand from an E4M3 one."""
    k = jax.random.split(jax.random.key(4), 4)
    n, d_in, r, d_out = 256, 512, 64, 256
    x = jax.random.normal(k[0], (n, d_in))
    w0 = jax.random.normal(k[1], (d_in, d_out)) / np.sqrt(d_in)
    a = jax.random.normal(k[2], (d_in, r)) / np.sqrt(d_in)
    b = jnp.zeros((r, d_out))  # adapters at initialisation: y = Q(x) Q(W0) and dx = Q(dy) Q(W0)^T exactly
    dy = jax.random.normal(k[3], (n, d_out))
    arith = FP8Arithmetic(saved="quantized")
    y = fp8_lora_linear(x, w0, a, b, scale=S, arithmetic=arith)
    dx, _, db = _grads(fp8_lora_linear, arith, x, w0, a, b, dy)
    exact = {"y": jnp.dot(x, w0, precision=HIGHEST), "dx": jnp.dot(dy, w0.T, precision=HIGHEST),
             "db": S * jnp.dot(jnp.dot(x, a, precision=HIGHEST).T, dy, precision=HIGHEST)}
    e4, e5 = _rounding_rms(3), _rounding_rms(2)
    predicted = {"y": np.hypot(e4, e4),                # Q4(x) Q4(W0)
                 "dx": np.hypot(e5, e4),               # Q5(dy) Q4(W0)^T
                 "db": np.sqrt(e5 ** 2 + 3 * e4 ** 2)}  # Q5(dy)^T Q4(H), H = Q4(x) Q4(A)
    rel = {name: float(jnp.sqrt(jnp.mean((got - exact[name]) ** 2) / jnp.mean(exact[name] ** 2)))
           for name, got in (("y", y), ("dx", dx), ("db", db))}
    for name, value in rel.items():
        assert 0.75 * predicted[name] < value < 1.25 * predicted[name], (name, value, predicted[name])
    assert rel["dx"] > 1.25 * np.hypot(e4, e4)  # outside the band an E4M3 gradient operand would give


@pytest.mark.parametrize("saved", ["float", "quantized"])
def test_saved_activations_are_one_byte_per_element(saved):
    """``saved="quantized"`` keeps x and H as float8 codes (1 byte per element) and one float32 scale each."""
    x, w0, a, b, _ = _inputs(5)
    arith = FP8Arithmetic(saved=saved)
    _, vjp = jax.vjp(lambda a: fp8_lora_linear(x, w0, a, b, scale=S, arithmetic=arith), a)
    kept = {str(leaf.dtype) for leaf in jax.tree.leaves(vjp)}
    assert ("float8_e4m3fn" in kept) == (saved == "quantized")
    counted = saved_residual_bytes(lambda p, x: fp8_lora_linear(x, w0, p[0], p[1], scale=S, arithmetic=arith),
                                   (a, b), x)
    tokens, d_in, r = x.shape[0] * x.shape[1], x.shape[-1], a.shape[1]
    per_element = 1 if saved == "quantized" else 4  # x (flattened to [N, in]) and H; float32 inputs here
    assert counted == per_element * tokens * (d_in + r) + (8 if saved == "quantized" else 0)


def test_bad_input():
    x, w0, a, b, _ = _inputs(6)
    with pytest.raises(ValueError, match="per-tensor FP8Format"):
        FP8Arithmetic(operands=FP8Format(element="e4m3", granularity="channel"))
    with pytest.raises(ValueError, match="per-tensor FP8Format"):
        FP8Arithmetic(gradient_operands=IntFormat(bits=8, granularity="tensor"))
    with pytest.raises(ValueError, match="round to nearest even"):
        FP8Arithmetic(gradient_rounding="stochastic")
    with pytest.raises(ValueError, match="needs GSEFormat operands"):
        FP8Arithmetic(accumulate="int32")
    with pytest.raises(ValueError, match="drop the key"):
        fp8_lora_linear(x, w0, a, b, scale=S, arithmetic=FP8Arithmetic(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="shapes do not chain"):
        fp8_lora_linear(x, w0, a.T, b, scale=S, arithmetic=FP8Arithmetic())
    with pytest.raises(TypeError, match="must be an FP8Arithmetic"):
        fp8_lora_linear(x, w0, a, b, scale=S, arithmetic=LoRAArithmetic())
