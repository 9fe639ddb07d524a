"""The custom-VJP LoRA linear against autodiff (no quantization) and against the spec's GEMM list (GSE)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import GSEFormat, IntFormat, dequantize, quantize
from jquant.ops import LoRAArithmetic, lora_linear

S = 0.25


def _inputs(seed, n=40, d_in=64, r=16, d_out=48):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (2, n // 2, d_in))
    w0 = 0.1 * jax.random.normal(k[1], (d_in, d_out))
    a = 0.1 * jax.random.normal(k[2], (d_in, r))
    b = 0.1 * jax.random.normal(k[3], (r, d_out))
    probe = jax.random.normal(k[4], (2, n // 2, d_out))  # loss = sum(y * probe): dy = probe
    return x, w0, a, b, probe


def _grads(arith, x, w0, a, b, probe, key=None):
    def loss(x, a, b):
        return jnp.sum(lora_linear(x, w0, a, b, scale=S, arithmetic=arith, key=key) * probe)
    return jax.jit(jax.grad(loss, (0, 1, 2)))(x, a, b)


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_unquantized_arithmetic_matches_autodiff(base):
    x, w0, a, b, probe = _inputs(0)
    w = quantize(w0, "nf4", axis=0) if base == "nf4" else w0
    dense = dequantize(w, jnp.float32) if base == "nf4" else w0
    bias = jnp.linspace(-1, 1, 48)
    arith = LoRAArithmetic(compute_dtype="float32")
    y = lora_linear(x, w, a, b, scale=S, arithmetic=arith, bias=bias)

    def plain(x, a, b):
        return x @ dense + S * (x @ a) @ b + bias
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x, a, b)), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda x, a, b: jnp.sum(jnp.sin(lora_linear(x, w, a, b, scale=S, arithmetic=arith, bias=bias))),
                   (0, 1, 2))(x, a, b)
    want = jax.grad(lambda x, a, b: jnp.sum(jnp.sin(plain(x, a, b))), (0, 1, 2))(x, a, b)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-6 * float(jnp.abs(h).max()))


def _q(v, fmt, axis):
    """Dequantized Q(v) along ``axis`` in float64 (the formats API, not the training path)."""
    return np.asarray(dequantize(quantize(jnp.asarray(v, jnp.float32), fmt, axis=axis)), np.float64)


def _spec_reference(x, w0, a, b, dy, fmt, saved):
    """Spec §3.2's seven GEMMs, each operand quantized along that GEMM's reduction axis, in float64."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    dy = np.asarray(dy, np.float64).reshape(-1, dy.shape[-1])
    w0 = np.asarray(w0, np.float64)
    h = _q(x, fmt, 1) @ _q(a, fmt, 0)
    y = _q(x, fmt, 1) @ _q(w0, fmt, 0) + S * _q(h, fmt, 1) @ _q(b, fmt, 0)
    xs, hs = (_q(x, fmt, 1), _q(h, fmt, 1)) if saved == "quantized" else (x, h)
    db = S * (_q(dy.T, fmt, 1) @ _q(hs, fmt, 0))
    dh = S * (_q(dy, fmt, 1) @ _q(np.asarray(b).T, fmt, 0))
    da = (_q(dh.T, fmt, 1) @ _q(xs, fmt, 0)).T
    dx = _q(dy, fmt, 1) @ _q(w0.T, fmt, 0) + _q(dh, fmt, 1) @ _q(np.asarray(a).T, fmt, 0)
    return y, dx, da, db.T


@pytest.mark.parametrize("fmt", [GSEFormat(bits=8), GSEFormat(bits=5, group_size=16),
                                 IntFormat(bits=8, granularity="tensor")], ids=lambda f: f.name)
@pytest.mark.parametrize("saved", ["float", "quantized"])
def test_quantized_gemms_follow_the_spec(fmt, saved):
    x, w0, a, b, dy = _inputs(1)
    arith = LoRAArithmetic(operands=fmt, saved=saved, compute_dtype="float32")
    y = lora_linear(x, w0, a, b, scale=S, arithmetic=arith)
    dx, da, db = _grads(arith, x, w0, a, b, dy)
    y_ref, dx_ref, da_ref, db_ref = _spec_reference(x, w0, a, b, dy, fmt, saved)
    for got, want in [(y, y_ref), (dx, dx_ref), (da, da_ref), (db, db_ref)]:
        got = np.asarray(got, np.float64).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int32_accumulation_equals_float32_accumulation():
    x, w0, a, b, dy = _inputs(2)
    f32 = LoRAArithmetic(operands=GSEFormat(bits=6), saved="quantized")
    i32 = dataclasses.replace(f32, accumulate="int32")
    for g, h in zip(_grads(f32, x, w0, a, b, dy), _grads(i32, x, w0, a, b, dy)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-6 * float(jnp.abs(h).max()))


def test_stochastic_gradient_rounding():
    x, w0, a, b, dy = _inputs(3)
    arith = LoRAArithmetic(operands=GSEFormat(bits=5), gradient_rounding="stochastic")
    g1 = _grads(arith, x, w0, a, b, dy, jax.random.key(1))
    g1b = _grads(arith, x, w0, a, b, dy, jax.random.key(1))
    g2 = _grads(arith, x, w0, a, b, dy, jax.random.key(2))
    for u, v, w in zip(g1, g1b, g2):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert not np.array_equal(np.asarray(u), np.asarray(w))
    nearest = dataclasses.replace(arith, gradient_rounding="nearest")
    y1 = lora_linear(x, w0, a, b, scale=S, arithmetic=arith, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(lora_linear(x, w0, a, b, scale=S, arithmetic=nearest)))


def test_saved_quantized_keeps_packed_codes():
    x, w0, a, b, _ = _inputs(4)
    arith = LoRAArithmetic(operands=GSEFormat(bits=5), saved="quantized")
    _, vjp = jax.vjp(lambda a: lora_linear(x, w0, a, b, scale=S, arithmetic=arith), a)
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(vjp)}
    assert "uint8" in dtypes and "int8" in dtypes  # packed 5-bit codes and int8 exponents


def test_bad_input():
    x, w0, a, b, _ = _inputs(5)
    gse = GSEFormat(bits=8)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        lora_linear(x, w0, a, b, scale=S, arithmetic=LoRAArithmetic(operands=gse, gradient_rounding="stochastic"))
    with pytest.raises(ValueError, match="drop the key"):
        lora_linear(x, w0, a, b, scale=S, arithmetic=LoRAArithmetic(operands=gse), key=jax.random.key(0))
    with pytest.raises(ValueError, match="shapes do not chain"):
        lora_linear(x, w0, a.T, b, scale=S, arithmetic=LoRAArithmetic())
    with pytest.raises(ValueError, match="only apply with an operand format"):
        LoRAArithmetic(saved="quantized")
    with pytest.raises(ValueError, match="needs GSEFormat operands"):
        LoRAArithmetic(operands=IntFormat(bits=8), accumulate="int32")
    with pytest.raises(ValueError, match="gradient_rounding instead"):
        LoRAArithmetic(operands=GSEFormat(bits=8, rounding="stochastic"))
    with pytest.raises(ValueError, match="bits=3"):
        GSEFormat(bits=3)
