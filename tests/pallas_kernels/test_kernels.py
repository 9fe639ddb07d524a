"""Every Pallas kernel in interpret mode against its pure-jnp reference on fresh random inputs.

Interpret mode fills outputs with NaN before the kernel runs (checked below), so a
finite result also proves that every output element was written.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jquant.formats import get_format, quantize
from jquant.pallas_kernels import registry
from jquant.pallas_kernels._common import TileConfig, round_half_even

_seed = itertools.count(1000)


def _inputs(m, k, n, weight, dtype=jnp.float32):
    key = jax.random.PRNGKey(next(_seed))
    kw, kx = jax.random.split(key)
    w = jax.random.normal(kw, (k, n)) * jnp.exp(jax.random.normal(kx, (1, n)))  # uneven channels
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    return x, quantize(w, weight, axis=0)


def _check_close(y, ref, rtol):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "the kernel left output elements unwritten (NaN poison)"
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < rtol, err


def test_interpret_mode_poisons_unwritten_outputs():
    def writes_half(x_ref, o_ref):
        o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]

    out = pl.pallas_call(writes_half, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                         interpret=True)(jnp.ones((16, 16)))
    assert np.all(np.isnan(np.asarray(out[8:])))


WEIGHT_ONLY = [("int4-g64", None), ("int4-g64-asym", None), ("int4", None), ("int8", None),
               ("int8-g64-asym", None), ("nvfp4", None), ("mxfp4", None)]
ACTIVATION = [("int8", "int8"), ("int4-g64", "int8"), ("int4-g64-asym", "int8"), ("int4-asym", "int8"),
              ("fp8-e4m3", "fp8-e4m3")]
CONFIGS = [TileConfig(16, 64, 64, 1, 4, 2), TileConfig(16, 32, 32, 2, 4, 2), TileConfig(32, 64, 64, 4, 4, 2)]


@pytest.mark.parametrize("weight, activation", WEIGHT_ONLY + ACTIVATION)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"bm{c.block_m}bn{c.block_n}bk{c.block_k}sk{c.split_k}")
def test_kernel_matches_reference(weight, activation, cfg):
    act = None if activation is None else get_format(activation)
    x, w = _inputs(5, 256, 128, weight)
    spec = registry.kernel_for(w, act)
    assert spec is not None
    _check_close(spec.run(x, w, act, cfg), spec.reference(x, w, act), 1e-5)


@pytest.mark.parametrize("weight", ["int4-g64-asym", "int8", "nvfp4", "mxfp4"])
def test_gemv_variant_matches_reference(weight):
    x, w = _inputs(1, 256, 128, weight)
    spec = registry.kernel_for(w, None)
    _check_close(spec.run(x, w, None, TileConfig(1, 64, 64, 2, 4, 2)), spec.reference(x, w, None), 1e-5)


@pytest.mark.parametrize("weight, activation", [("int8", "int8"), ("int4-g64", "int8"), ("fp8-e4m3", "fp8-e4m3")])
def test_in_kernel_activation_quantization_matches_reference(weight, activation):
    act = get_format(activation)
    x, w = _inputs(20, 256, 64, weight)
    spec = registry.kernel_for(w, act)
    cfg = TileConfig(16, 64, 64, 1, 4, 2, quantize_in_kernel=True)
    _check_close(spec.run(x, w, act, cfg), spec.reference(x, w, act), 1e-5)


@pytest.mark.parametrize("weight, activation", [("int8", "int8"), ("fp8-e4m3", "fp8-e4m3")])
def test_native_lowp_dot_matches_reference(weight, activation):
    act = get_format(activation)
    x, w = _inputs(7, 128, 96, weight)
    spec = registry.get(registry.NATIVE)
    assert spec.supports(w, act)
    _check_close(spec.run(x, w, act, None), spec.reference(x, w, act), 1e-5)


def test_bf16_activations_match_reference_to_bf16_precision():
    x, w = _inputs(3, 256, 128, "int4-g64", jnp.bfloat16)
    spec = registry.kernel_for(w, None)
    y = spec.run(x, w, None, CONFIGS[0])
    assert y.dtype == jnp.bfloat16
    _check_close(y, spec.reference(x.astype(jnp.float32), w, None), 1e-2)


def test_round_half_even_matches_jnp_round():
    v = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(next(_seed)), (4096,)) * 200,
                         jnp.arange(-300, 300) * 0.5])
    np.testing.assert_array_equal(np.asarray(jax.jit(round_half_even)(v)), np.asarray(jnp.round(v)))


def test_bad_inputs_raise_clear_errors():
    x, w = _inputs(4, 256, 128, "int4-g64")
    spec = registry.kernel_for(w, None)
    with pytest.raises(ValueError, match="K=128 but the weight has K=256"):
        spec.check(x[:, :128], w, None, CONFIGS[0])
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        spec.check(x.astype(jnp.int32), w, None, CONFIGS[0])
    with pytest.raises(ValueError, match="block_k=128 must divide the group size 64"):
        spec.check(x, w, None, TileConfig(16, 64, 128))
    with pytest.raises(ValueError, match="N=128 is not a multiple of block_n=256"):
        spec.check(x, w, None, TileConfig(16, 256, 64))
    with pytest.raises(ValueError, match="must be a power of two"):
        spec.check(x, w, None, TileConfig(16, 48, 64))
    i8 = registry.get("pallas-int8-activation")
    with pytest.raises(ValueError, match="per-token symmetric int8"):
        i8.check(x, w, get_format("int8-asym"), CONFIGS[0])
    with pytest.raises(ValueError, match="8-bit zero points overflow int8"):
        i8.check(x, quantize(jnp.ones((256, 128)), "int8-asym", axis=0), get_format("int8"), CONFIGS[0])
