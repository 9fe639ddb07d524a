"""MinMaxFormat (the KV caches' min-max groups) against a float64 numpy transcription of SKVQ §3.2."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import MinMaxFormat, QArray, dequantize, quantize, unpack_codes


def _reference(x: np.ndarray, fmt: MinMaxFormat, axis: int) -> np.ndarray:
    """Group by group in float64 numpy: stored (rounded) scale and offset, codes from the stored values."""
    meta = np.dtype(ml_dtypes.float8_e4m3fn if fmt.meta_dtype == "float8_e4m3fn" else fmt.meta_dtype)
    big = float(ml_dtypes.finfo(meta).max)
    floor = max(1e-5, float(ml_dtypes.finfo(meta).smallest_subnormal))
    xm = np.moveaxis(x.astype(np.float64), axis, -1)
    out = np.empty_like(xm)
    edges = np.concatenate([[0], np.cumsum(fmt.groups(xm.shape[-1]))])
    for a, b in zip(edges[:-1], edges[1:]):
        g = xm[..., a:b]
        lo, hi = g.min(-1, keepdims=True) * fmt.clip, g.max(-1, keepdims=True) * fmt.clip
        s = np.maximum((hi - lo) / fmt.levels, floor).astype(np.float32)
        s = np.clip(s, -big, big).astype(meta).astype(np.float64)
        z = np.clip(lo.astype(np.float32), -big, big).astype(meta).astype(np.float64)
        q = np.clip(np.round((g - z) / s), 0, fmt.levels)
        out[..., a:b] = q * s + z
    return np.moveaxis(out, -1, axis)


CASES = {
    "1.5bit-g8": (MinMaxFormat(bits=1.5, group_size=8), 2),
    "2bit-var": (MinMaxFormat(bits=2, group_sizes=(5, 11, 16)), 2),
    "3bit-g16-clip": (MinMaxFormat(bits=3, group_size=16, clip=0.85), 2),
    "4bit-whole-axis1": (MinMaxFormat(bits=4), 1),
    "8bit-fp8-meta": (MinMaxFormat(bits=8, group_size=32, meta_dtype="float8_e4m3fn"), 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_minmax_matches_float64_reference(name):
    fmt, axis = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    x = (rng.standard_normal((3, 8, 32)) * rng.uniform(0.1, 4.0, (1, 1, 32))).astype(np.float32)
    q = quantize(jnp.asarray(x), fmt, axis=axis)
    assert isinstance(q, QArray) and q.validate() is q and q.codes.dtype == jnp.uint8
    got, want = np.asarray(dequantize(q), np.float64), _reference(x, fmt, axis)
    # float32 arithmetic against float64: a code may flip where (x - z) / s sits on a rounding boundary
    assert np.isclose(got, want, rtol=1e-5, atol=1e-5).mean() > 0.995, name
    codes = np.asarray(unpack_codes(q))
    assert codes.min() >= 0 and codes.max() <= fmt.levels
    lo, hi = (np.asarray(v) for v in fmt.value_range(q))
    assert np.all(got >= lo - 1e-6) and np.all(got <= hi + 1e-6)
    n = x.shape[axis]
    code_bytes = -(-n // 5) if fmt.bits == 1.5 else n * fmt.bits // 8  # trits five per byte, else b bits per code
    meta_bytes = 2 * jnp.dtype(fmt.meta_dtype).itemsize * len(fmt.groups(n))
    assert q.bits_per_element == pytest.approx(8 * (code_bytes + meta_bytes) / n)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits"), (dict(bits=2, group_size=0), "group_size"), (dict(bits=2, clip=1.5), "clip"),
    (dict(bits=2, group_size=4, group_sizes=(4,)), "not both"), (dict(bits=2, meta_dtype="int8"), "meta_dtype"),
])
def test_minmax_bad_descriptor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MinMaxFormat(**kwargs)


def test_minmax_groups_must_fit_the_axis():
    x = jnp.ones((2, 30), jnp.float32)
    with pytest.raises(ValueError, match="group_sizes sum to 32"):
        quantize(x, MinMaxFormat(bits=2, group_sizes=(16, 16)), axis=1)
    with pytest.raises(ValueError, match="divide"):
        quantize(x, MinMaxFormat(bits=2, group_size=16), axis=1)


@pytest.mark.parametrize("largest", [True, False])
def test_first_extreme_matches_jnp_and_its_gradient_where_unique_and_stays_finite_at_ties(largest):
    from jquant.formats._blocks import max_first, min_first

    ours, plain = (max_first, jnp.max) if largest else (min_first, jnp.min)
    x = jnp.asarray(np.random.default_rng(int(largest)).normal(size=(3, 5, 7)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(9).normal(size=(3, 7)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours(x, 1)), np.asarray(plain(x, axis=1)))
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad(lambda x: ours(x, 1))), np.asarray(grad(lambda x: plain(x, axis=1))),
                               rtol=0, atol=1e-7)
    tied = jnp.zeros((2, 4), jnp.float32)  # every element attains the extreme: the first one takes the gradient
    expected = np.zeros((2, 4), np.float32)
    expected[0, :] = 1.0
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(ours(x, 0)))(tied)), expected)
