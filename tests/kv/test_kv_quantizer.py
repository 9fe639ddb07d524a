"""KVQuantizer against a float64 numpy transcription of SKVQ §3.2 / KIVI / WKVQuant §3.3, on fresh random inputs."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.formats import QArray
from jquant.formats.packing import pack_trits, unpack_trits
from jquant.kv import FormatKV, KVQuantizer

B, T, K, D = 2, 8, 2, 16
C = K * D


def _x(seed, t=T, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, t, K, D)).astype(np.float32)
    if outliers:  # a few channels with large ranges, as real keys have
        x = x * np.where(rng.random((1, 1, K, D)) < 0.15, 12.0, 1.0).astype(np.float32)
    return x


def _store(v, dtype):
    dt = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
          "float32": np.float32}[dtype]
    big = float(ml_dtypes.finfo(dt).max)
    return np.clip(v, -big, big).astype(dt).astype(np.float64)


def _reference(x, q: KVQuantizer, smooth=None):
    """dequantize(quantize(x)) by the spec's equations, float64 numpy, groups by explicit index lists."""
    x = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    if smooth is not None:
        x = (x - smooth[0]) / smooth[1]
    perm = np.arange(x.shape[-1]) if q.perm is None else np.asarray(q.perm)
    xp = x[..., perm]
    out = np.empty_like(xp)
    floor = max(1e-5, float(ml_dtypes.finfo(jnp.dtype(q.meta_dtype)).smallest_subnormal))
    if q.axis == "token":
        bounds = np.concatenate([[0], np.cumsum(q.groups(xp.shape[-1]))])
        groups = [(slice(None), slice(None), slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        groups = [(slice(None), slice(j, j + q.block), slice(c, c + 1))
                  for j in range(0, xp.shape[1], q.block) for c in range(xp.shape[-1])]
    for g in groups:
        part = xp[g]
        red = (2,) if q.axis == "token" else (1,)
        lo, hi = q.clip * part.min(axis=red, keepdims=True), q.clip * part.max(axis=red, keepdims=True)
        s = _store(np.maximum((hi - lo) / q.levels, floor), q.meta_dtype)
        z = _store(lo, q.meta_dtype)
        out[g] = np.clip(np.round((part - z) / s), 0, q.levels) * s + z
    y = out[..., np.argsort(perm)]
    if smooth is not None:
        y = y * smooth[1] + smooth[0]
    return y.reshape(x.shape[0], x.shape[1], K, D)


QUANTIZERS = {
    "rtn-head": KVQuantizer(bits=4, group_size=D),
    "rtn-2bit-g8-fp8": KVQuantizer(bits=2, group_size=8, meta_dtype="float8_e4m3fn"),
    "ternary": KVQuantizer(bits=1.5, group_size=D, clip=0.9),
    "3bit-bf16": KVQuantizer(bits=3, group_size=D, meta_dtype="bfloat16"),
    "8bit": KVQuantizer(bits=8, group_size=C),
    "kivi-keys": KVQuantizer(bits=2, axis="channel", group_size=4),
    "skvq": KVQuantizer(bits=2, group_sizes=(5, 11, 3, 13), perm=tuple(np.random.default_rng(0).permutation(C)),
                        clip=0.92, meta_dtype="float8_e4m3fn"),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_encode_decode_matches_spec_reference(name):
    q = QUANTIZERS[name]
    x = _x(1)
    stored = q.encode(jnp.asarray(x))
    got = np.asarray(q.decode(stored, x.shape), np.float64)
    want = _reference(x, q)
    # float32 arithmetic against float64: a code may flip where (x - z) / s sits on a rounding boundary
    close = np.isclose(got, want, rtol=1e-5, atol=1e-5)
    assert close.mean() > 0.995, name
    assert np.all(np.abs(got - want) <= np.abs(want).max() * 1e-5 + _step_bound(x, q)), name
    # the fake (simulated) path is bit-identical to the packed round trip
    np.testing.assert_array_equal(np.asarray(q.fake(jnp.asarray(x))), np.asarray(q.decode(stored, x.shape)))
    # the store is a validated QArray of the quantizer's format; bits per element counted from its arrays
    assert isinstance(stored, QArray) and stored.format == q.format
    stored.validate()
    assert q.bits_per_element(C) == pytest.approx(8 * stored.nbytes / x.size)


def _step_bound(x, q):
    """One quantization step of the widest group: the largest error a flipped code can add."""
    return float(np.ptp(x)) / q.levels


def test_smoothing_is_applied_and_differentiable():
    q = KVQuantizer(bits=2, group_size=D)
    x = _x(2)
    rng = np.random.default_rng(3)
    shift, scale = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 4.0, C).astype(np.float32)
    smooth = (jnp.asarray(shift), jnp.asarray(scale))
    got = np.asarray(q.fake(jnp.asarray(x), smooth), np.float64)
    np.testing.assert_allclose(got, _reference(x, q, (shift.astype(np.float64), scale.astype(np.float64))),
                               atol=1e-4 * np.abs(x).max())

    def loss(sh, sc):
        return jnp.mean(jnp.abs(q.fake(jnp.asarray(x), (sh, sc)) - jnp.asarray(x)))

    g_shift, g_scale = jax.grad(loss, argnums=(0, 1))(*smooth)
    assert np.all(np.isfinite(g_shift)) and np.all(np.isfinite(g_scale))
    assert np.abs(np.asarray(g_scale)).max() > 0 and np.abs(np.asarray(g_shift)).max() > 0


def test_clip_saturates_and_fewer_bits_cost_more_error():
    x = _x(4)
    errs = {b: float(np.mean((np.asarray(KVQuantizer(bits=b, group_size=D).fake(jnp.asarray(x))) - x) ** 2))
            for b in (1.5, 2, 3, 4, 8)}
    assert errs[1.5] > errs[2] > errs[3] > errs[4] > errs[8] > 0
    clipped = np.asarray(KVQuantizer(bits=4, group_size=C, clip=0.5).fake(jnp.asarray(x))).reshape(B, T, C)
    flat = x.reshape(B, T, C)
    assert np.all(clipped.max(-1) <= 0.5 * flat.max(-1) + 1e-3 * np.abs(flat).max())


def test_trit_packing_round_trip():
    rng = np.random.default_rng(5)
    for n in (1, 5, 7, 64):
        codes = rng.integers(0, 3, size=(3, n))
        packed = pack_trits(jnp.asarray(codes))
        assert packed.dtype == jnp.uint8 and packed.shape == (3, -(-n // 5))
        np.testing.assert_array_equal(np.asarray(unpack_trits(packed, n)), codes)


def test_format_kv_round_trip():
    q = FormatKV.of("int4-asym")
    x = _x(6)
    np.testing.assert_array_equal(np.asarray(q.decode(q.encode(jnp.asarray(x)), x.shape)),
                                  np.asarray(q.fake(jnp.asarray(x))))


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="bits=5"):
        KVQuantizer(bits=5, group_size=8)
    with pytest.raises(ValueError, match="group_size=24 does not divide the 32 channels"):
        KVQuantizer(bits=2, group_size=24).check(K, D)
    with pytest.raises(ValueError, match="perm has 8 entries"):
        KVQuantizer(bits=2, group_size=8, perm=tuple(range(8))).check(K, D)
    with pytest.raises(ValueError, match="group_sizes sum to 30"):
        KVQuantizer(bits=2, group_sizes=(10, 20)).check(K, D)
    with pytest.raises(ValueError, match="clip"):
        KVQuantizer(bits=2, group_size=8, clip=1.5)
    with pytest.raises(ValueError, match="meta_dtype"):
        KVQuantizer(bits=2, group_size=8, meta_dtype="int8")
    with pytest.raises(ValueError, match="ternary"):
        KVQuantizer(bits=1.5, axis="channel", group_size=8)
