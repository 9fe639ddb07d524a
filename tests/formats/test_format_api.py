"""quantize / dequantize / fake_quantize: error levels, STE gradients, input errors, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import (bits_per_element, check_finite, dequantize, fake_quantize,
                            get_format, quantize)

# low_precision_formats.md §4: relative MSE on 4096 N(0,1) samples, +-20 %
SPEC_REL_MSE = {"nvfp4": 0.0089, "mxfp4": 0.0135, "mxfp6-e2m3": 0.0008, "mxfp6-e3m2": 0.0028,
                "mxfp8-e4m3": 0.0009, "mxfp8-e5m2": 0.0028, "int8-tensor": 8e-5}


def test_relative_mse_levels_of_the_spec():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    for name, want in SPEC_REL_MSE.items():
        xq = np.asarray(dequantize(quantize(x, name, axis=0)), np.float64)
        rel = np.mean((x - xq) ** 2) / np.mean(x.astype(np.float64) ** 2)
        assert 0.8 * want <= rel <= 1.2 * want, (name, rel, want)


@pytest.mark.parametrize("name", ["int4-g32", "nvfp4", "gse-int6"])
def test_ste_gradients_and_forward_value(name):
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) * 2
    fwd = fake_quantize(x, name, axis=0)
    np.testing.assert_array_equal(np.asarray(fwd), np.asarray(dequantize(quantize(x, name, axis=0))))
    g = jax.grad(lambda a: jnp.sum(fake_quantize(a, name, axis=0)))(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones(x.shape))
    g0 = jax.grad(lambda a: jnp.sum(fake_quantize(a, name, axis=0, straight_through=False)))(x)
    assert np.all(np.asarray(g0) == 0)
    gj = jax.jit(jax.grad(lambda a: jnp.sum(fake_quantize(a, name, axis=0))))(x)
    np.testing.assert_array_equal(np.asarray(gj), np.ones(x.shape))


def test_clipped_ste_masks_saturated_values():
    x = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    fmt = get_format("int4-g32", clip_ratio=0.5)
    g = np.asarray(jax.grad(lambda a: jnp.sum(fake_quantize(a, fmt, axis=0, straight_through="clipped")))(x))
    q = quantize(x, fmt, axis=0)
    s = np.repeat(np.asarray(q.scales, np.float32), 32, axis=0)
    inside = np.abs(np.asarray(x)) <= 7 * s
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    assert 0 < g.mean() < 1
    with pytest.raises(ValueError, match="straight_through"):
        fake_quantize(x, fmt, axis=0, straight_through="soft")


def test_fake_quantize_keeps_dtype_and_dequantize_default_dtype():
    x = np.random.default_rng(3).standard_normal((32, 4)).astype(np.float32).astype(jnp.bfloat16)
    q = quantize(x, "mxfp4", axis=0)
    assert q.dtype == "bfloat16" and dequantize(q).dtype == jnp.bfloat16
    assert dequantize(q, jnp.float32).dtype == jnp.float32
    assert fake_quantize(x, "mxfp4", axis=0).dtype == jnp.bfloat16
    assert bits_per_element(q) == 4.25


def test_non_finite_inputs_raise_eagerly_and_propagate_under_jit():
    x = np.ones((32, 4), np.float32)
    x[3, 1] = np.nan
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="2 non-finite values"):
        quantize(x, "int8", axis=0)
    with pytest.raises(ValueError, match="non-finite"):
        check_finite(jnp.asarray(x))
    out = jax.jit(lambda a: dequantize(quantize(a, "int8", axis=0)))(x)  # documented: no check
    assert out.shape == x.shape


def test_bad_axis_dtype_and_format():
    x = jnp.ones((32, 4))
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an array of rank 2"):
        quantize(x, "int8", axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        quantize(x, "int8", axis=None)
    with pytest.raises(TypeError, match="floating"):
        quantize(jnp.ones((32, 4), jnp.int32), "int8", axis=0)
    with pytest.raises(ValueError, match="scalar"):
        quantize(jnp.float32(1.0), "int8", axis=0)
    with pytest.raises(TypeError, match="Format"):
        quantize(x, 4, axis=0)


def test_jit_with_static_format_and_expert_stacks():
    w = np.random.default_rng(4).standard_normal((3, 64, 8)).astype(np.float32)  # [E, in, out]: contraction axis 1
    f = jax.jit(quantize, static_argnames=("fmt", "axis"))
    q = f(w, get_format("int4-g32"), axis=1)
    assert q.scales.shape == (3, 2, 8) and q.codes.shape == (3, 32, 8)
    ref = quantize(w, "int4-g32", axis=1)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    per_expert = [np.asarray(dequantize(quantize(w[e], "int4-g32", axis=0))) for e in range(3)]
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.stack(per_expert))
