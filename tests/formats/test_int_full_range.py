"""Full-range symmetric integers (``symmetric_range="full"``) against compressed-tensors, packing, GPTQ, names.

compressed-tensors (llm-compressor, vLLM) quantizes a symmetric int-b group with
``s = amax / ((2^b - 1) / 2)`` rounded to the scale dtype and ``q = round(clamp(x / s, -2^(b-1), 2^(b-1) - 1))``
(``calculate_qparams`` + ``quantize``); jquant's full-range format must give the same codes, scales and values.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import IntFormat, dequantize, get_format, quantize, unpack_codes
from jquant.formats.packing import pack_bits, to_signed, unpack_bits

torch = pytest.importorskip("torch")


def _ct_quantize(w_in_out: np.ndarray, bits: int, group: int | None, scale_dtype):
    """compressed-tensors' codes, scales and dequantized values of ``w [in, out]`` (its layout: ``[out, in]``)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    assert ct.__version__  # the reference is the installed package
    w = torch.from_numpy(np.ascontiguousarray(w_in_out.T))
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy=strategy, group_size=group,
                            scale_dtype=scale_dtype)
    view = w.unflatten(-1, (w.shape[-1] // group, group)) if group else w[:, None, :]
    scale, zp = calculate_qparams(view.amin(-1), view.amax(-1), args)  # the min-max observer's statistics
    codes = ct_quantize(w, scale, zp, args, dtype=torch.int8)
    deq = ct_dequantize(codes, scale, zp, args)
    return codes.numpy().T.astype(np.int32), scale.numpy().T, deq.numpy().T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 128, None])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_codes_scales_values_equal_compressed_tensors(bits, group, scale_dtype):
    rng = np.random.default_rng(bits * 1000 + (group or 0) + len(scale_dtype))
    w = (rng.standard_t(df=4, size=(256, 40)) * rng.uniform(0.01, 0.2, size=40)).astype(np.float32)
    fmt = IntFormat(bits=bits, group_size=group, symmetric_range="full", scale_dtype=scale_dtype)
    q = quantize(jnp.asarray(w), fmt, axis=0)
    ct_scale_dtype = None if scale_dtype == "float32" else torch.float16  # None: the weight's dtype
    ref_codes, ref_scales, ref_values = _ct_quantize(w, bits, group, ct_scale_dtype)
    codes = np.asarray(unpack_codes(q))
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float32), ref_scales)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_values)
    assert codes.min() == -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1  # the extra level is used


def test_all_zero_group_stores_compressed_tensors_eps_scale():
    w = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
    w[:64, 3] = 0.0
    q = quantize(jnp.asarray(w), "int4-g64-full", axis=0)
    _, ref_scales, ref_values = _ct_quantize(w, 4, 64, torch.float16)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float32), ref_scales)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_values)


def test_restricted_is_the_default_and_differs_from_full():
    """Symmetric names written before the option keep their meaning: 2^b - 1 levels, scale amax / qmax."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(128, 16)), jnp.float32)
    old, full = get_format("int4-g64"), get_format("int4-g64-full")
    assert old.symmetric_range == "restricted" and (old.qmin, old.qmax) == (-7, 7)
    assert (full.qmin, full.qmax, full.scale_divisor) == (-8, 7, 7.5)
    amax = np.abs(np.asarray(w)).reshape(2, 64, 16).max(1)
    np.testing.assert_array_equal(np.asarray(quantize(w, old, axis=0).scales), (amax / 7).astype(np.float16))
    np.testing.assert_array_equal(np.asarray(quantize(w, full, axis=0).scales), (amax / 7.5).astype(np.float16))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_round_trips_every_full_range_code(bits):
    codes = jnp.asarray(np.tile(np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)), 3)[:, None] * np.ones((1, 5), int))
    packed = pack_bits(codes, bits, axis=0)
    back = to_signed(unpack_bits(packed, bits, codes.shape[0], axis=0), bits)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stored_codes_round_trip_through_the_qarray(bits):
    w = jnp.asarray(np.random.default_rng(bits).normal(size=(192, 12)), jnp.float32)
    fmt = IntFormat(bits=bits, group_size=64, symmetric_range="full", scale_dtype="float32")
    q = quantize(w, fmt, axis=0)
    s = np.repeat(np.asarray(q.scales), 64, axis=0)
    want = np.clip(np.round(np.asarray(w) / s), fmt.qmin, fmt.qmax)
    np.testing.assert_array_equal(np.asarray(unpack_codes(q)), want)
    assert want.min() == fmt.qmin


@pytest.mark.parametrize("name", ["int4-full", "int2-g64-full", "int3-tensor-full", "int8-g128-full", "int4-g96-full"])
def test_names_are_unique_and_round_trip(name):
    fmt = get_format(name)
    assert fmt.name == name and fmt.symmetric_range == "full" and fmt.symmetric
    assert get_format(name.removesuffix("-full")).name == name.removesuffix("-full")
    assert get_format(fmt.name, clip_search=True) == dataclasses.replace(fmt, clip_search=True)
    assert get_format(name.removesuffix("-full"), symmetric_range="full") == fmt


def test_bad_symmetric_range_names_the_field_and_the_fix():
    with pytest.raises(ValueError, match="symmetric_range='half'.*one of"):
        IntFormat(bits=4, symmetric_range="half")
    with pytest.raises(ValueError, match="symmetric formats only"):
        get_format("int4-g64-asym", symmetric_range="full")


def test_value_range_and_range_surrogate_use_the_full_grid():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 6)), jnp.float32)
    fmt = IntFormat(bits=3, group_size=32, symmetric_range="full", scale_dtype="float32")
    q = quantize(x, fmt, axis=0)
    lo, hi = fmt.value_range(q)
    s = np.repeat(np.asarray(q.scales), 32, axis=0)
    np.testing.assert_array_equal(np.asarray(lo), -4 * s)
    np.testing.assert_array_equal(np.asarray(hi), 3 * s)
    np.testing.assert_allclose(np.asarray(fmt.range_surrogate(x, 0)), np.asarray(dequantize(q)), rtol=1e-6, atol=1e-7)


def _reference_gptq(w, h, bits, group, damp=0.01):
    """Row-at-a-time GPTQ in float64 on the full-range grid, group scales from the current (updated) rows."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i in range(len(w)):
        if i % group == 0:
            s = np.abs(w[i:i + group]).max(0) / ((qmax - qmin) / 2)
        q[i] = np.clip(np.round(w[i] / s), qmin, qmax) * s
        w[i + 1:] -= np.outer(u[i, i + 1:], (w[i] - q[i]) / u[i, i])
    return q


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_on_the_full_range_matches_a_float64_reference_and_beats_rtn(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(512, 16)) @ rng.normal(size=(16, 128)) + 0.1 * rng.normal(size=(512, 128))
    w, h = rng.normal(size=(128, 32)).astype(np.float32), x.T @ x
    fmt = IntFormat(bits=bits, group_size=64, symmetric_range="full", scale_dtype="float32")
    stats = InputStatistics(hessian=h.astype(np.float32), count=512.0, absmax=np.abs(x).max(0))
    got = gptq_weight(jnp.asarray(w), fmt, axis=0, stats=stats, options={"act_order": False})  # the reference's order
    codes, values = np.asarray(unpack_codes(got)), np.asarray(dequantize(got))
    assert codes.min() == fmt.qmin and codes.max() <= fmt.qmax
    ref = _reference_gptq(w, h, bits, 64)
    out_err = lambda v: float(np.sum((x @ (w - v)) ** 2))  # noqa: E731
    assert np.mean(np.isclose(values, ref, rtol=1e-4, atol=1e-6)) > 0.98  # float32 vs float64: rare flipped roundings
    assert out_err(values) < 1.02 * out_err(ref)
    rtn = np.asarray(dequantize(quantize(jnp.asarray(w), fmt, axis=0)))
    assert out_err(values) < 0.8 * out_err(rtn)
