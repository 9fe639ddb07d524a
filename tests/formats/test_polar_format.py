"""PolarVQFormat (PCDVQ storage): float64 numpy reference encode/decode, RHT, packing, bits, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.formats import PolarVQFormat, dequantize, get_format, quantize, unpack_codes
from jquant.formats.packing import packed_length
from jquant.numerics.hadamard import hadamard_numpy

FMT = PolarVQFormat(vector_dim=8, direction_bits=8, magnitude_bits=2)


def _rotations(fmt, n, m):
    """Dense float64 R_in = S_in H_n, R_out = S_out H_m, with W̃ = R_inᵀ W R_out."""
    s_in, s_out = fmt.signs(n, 0).astype(np.float64), fmt.signs(m, 1).astype(np.float64)
    return s_in[:, None] * hadamard_numpy(n), s_out[:, None] * hadamard_numpy(m)


def _reference(w, fmt):
    """Nearest PCD rounding in float64 numpy: indices [nv, out] and the decoded weight."""
    c_d, c_r = (np.asarray(c, np.float64) for c in fmt.codebooks())
    n, m = w.shape
    r_in, r_out = _rotations(fmt, n, m)
    wt = r_in.T @ w @ r_out
    s = np.sqrt(np.mean(wt ** 2)) if fmt.scale == "tensor" else np.sqrt(np.mean(wt ** 2, 0, keepdims=True))
    v = (wt / s).reshape(n // 8, 8, m).transpose(0, 2, 1)
    i_d = np.argmax(v @ c_d.T, -1)
    i_r = np.argmin(np.abs(np.linalg.norm(v, axis=-1)[..., None] - c_r), -1)
    vhat = c_r[i_r][..., None] * c_d[i_d]
    w_hat = r_in @ (vhat.transpose(0, 2, 1).reshape(n, m) * s) @ r_out.T
    return i_d, i_r, w_hat


@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_encode_decode_match_float64_reference(scale):
    rng = np.random.default_rng(0)
    fmt = PolarVQFormat(vector_dim=8, direction_bits=8, magnitude_bits=2, scale=scale)
    w = rng.standard_normal((64, 48)) * np.exp(rng.standard_normal(48))[None]  # 48 = 12 * 4 (non-power-of-two H)
    q = quantize(jnp.asarray(w, jnp.float32), fmt, axis=0)
    i_d, i_r, w_hat = _reference(w, fmt)
    idx = np.asarray(unpack_codes(q))
    # float32 vs float64 may flip a near-tie; require almost all to agree and decode what was chosen exactly
    assert np.mean(idx[:, 0] == i_d) > 0.98 and np.mean(idx[:, 1] == i_r) > 0.98
    c_d, c_r = (np.asarray(c, np.float64) for c in fmt.codebooks())
    r_in, r_out = _rotations(fmt, 64, 48)
    s = np.asarray(q.scales, np.float64)
    vhat = c_r[idx[:, 1]][..., None] * c_d[idx[:, 0]]
    want = r_in @ (vhat.transpose(0, 2, 1).reshape(64, 48) * s) @ r_out.T
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the reconstruction error is that of the reference within float32 noise
    err, ref_err = np.mean((np.asarray(dequantize(q)) - w) ** 2), np.mean((w_hat - w) ** 2)
    assert abs(err - ref_err) < 0.02 * ref_err


def test_rotation_round_trip_and_chunk_norms_are_codebook_levels():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((256, 96)), jnp.float32)
    fmt = get_format("pcdvq-d8-a8-b2")
    np.testing.assert_allclose(np.asarray(fmt.unrotate(fmt.rotate(w))), np.asarray(w), atol=1e-5)
    q = quantize(w, fmt, axis=0)
    norms = np.linalg.norm(np.asarray(fmt.decode_rotated(q)).reshape(32, 8, 96), axis=1)
    levels = np.asarray(q.scales) * fmt.codebooks()[1]
    assert np.all(np.min(np.abs(norms[..., None] - levels), -1) < 1e-4 * levels.max())


def test_packing_is_bit_exact_and_bits_counted_from_arrays():
    rng = np.random.default_rng(2)
    fmt = PolarVQFormat(vector_dim=8, direction_bits=11, magnitude_bits=3)
    n, m = 128, 32
    i_d = rng.integers(0, 2 ** 11, (n // 8, m))
    i_r = rng.integers(0, 8, (n // 8, m))
    from jquant.formats.polar import from_indices
    q = from_indices(jnp.asarray(i_d), jnp.asarray(i_r), jnp.ones((1, 1), jnp.float32), fmt, (n, m), "float32")
    np.testing.assert_array_equal(np.asarray(unpack_codes(q)), np.stack([i_d, i_r], 1))
    assert q.codes.shape == (packed_length(16, 11) + packed_length(16, 3), m)
    assert q.bits_per_element == 8 * (q.codes.size + 4) / (n * m)
    assert abs(q.bits_per_element - (11 + 3) / 8) < 0.01
    assert fmt.shared_table_bytes == 2 ** 11 * 8 * 2 + 8 * 4


def test_all_zero_weight_decodes_to_zeros_and_zero_columns_per_channel():
    z = jnp.zeros((64, 16), jnp.float32)
    q = quantize(z, FMT, axis=0)
    assert np.all(np.asarray(dequantize(q)) == 0)
    w = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    ch = PolarVQFormat(vector_dim=8, direction_bits=8, magnitude_bits=2, scale="channel", rht=False)
    w[:, 5] = 0
    out = np.asarray(dequantize(quantize(jnp.asarray(w), ch, axis=0)))
    assert np.all(np.isfinite(out)) and np.all(out[:, 5] == 0)


def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="vector_dim=3"):
        PolarVQFormat(vector_dim=3)
    with pytest.raises(ValueError, match="direction_bits=17"):
        PolarVQFormat(direction_bits=17)
    with pytest.raises(ValueError, match="does not divide the input size 20"):
        quantize(jnp.zeros((20, 16)), FMT, axis=0)
    with pytest.raises(ValueError, match="no Hadamard matrix.*rht=False"):
        quantize(jnp.zeros((88, 16)), FMT, axis=0)  # 88 = 8 * 11 has no Hadamard construction
    with pytest.raises(ValueError, match=r"\[in, out\] weights"):
        quantize(jnp.zeros((64, 16)), FMT, axis=1)
    assert np.all(np.isfinite(np.asarray(dequantize(quantize(jnp.zeros((88, 16)), PolarVQFormat(
        vector_dim=8, direction_bits=8, magnitude_bits=2, rht=False), axis=0)))))


def test_registry_names_round_trip():
    for name in ("pcdvq-d8-a14-b2", "pcdvq-d4-a10-b2-ch", "pcdvq-d8-a16-b2-norht-s7"):
        assert get_format(name).name == name
    assert get_format("pcdvq-d8-a14-b2", scale="channel").name == "pcdvq-d8-a14-b2-ch"


def test_linear_rotates_activations_and_matches_the_dequantize_path():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((64, 96)) / 8, jnp.float32)
    q = quantize(w, FMT, axis=0)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(dequantize(q), np.float64)
    with jq.ops.record_dispatch() as rec:
        fast = jq.ops.linear(jnp.asarray(x), q)
    assert rec[0].path == "pcdvq-xla-rht"
    with jq.ops.force_path("xla"):
        slow = jq.ops.linear(jnp.asarray(x), q)
    np.testing.assert_allclose(np.asarray(fast), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(slow), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
