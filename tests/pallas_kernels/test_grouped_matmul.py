"""The grouped (MoE) matmul (``pallas_kernels/grouped_matmul.py``) in interpret mode against its reference.

Fresh random inputs per test. Interpret mode poisons outputs with NaN before the kernel
runs (checked in test_kernels.py), so finite output rows prove that every tile feeding
them was written; padding rows (past ``sum(group_sizes)``) must be exactly 0.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import dequantize, get_format, quantize
from jquant.pallas_kernels import grouped_matmul as gm
from jquant.pallas_kernels._common import TileConfig

_seed = itertools.count(7000)

K, N = 256, 128
SIZES = (7, 0, 20, 6)  # a group with no rows, one spanning two 16-row tiles; 40 rows leave 7 of padding
CFG = TileConfig(16, 64, 64, 1, 4, 2)
CFG_SPLIT = TileConfig(16, 32, 128, 2, 4, 2)  # split-K, four N tiles, one step per 128-row scale group


def _weights(g, weight, dtype=jnp.float32):
    kw, kc = jax.random.split(jax.random.PRNGKey(next(_seed)))
    w = jax.random.normal(kw, (g, K, N)) * jnp.exp(jax.random.normal(kc, (g, 1, N)))  # uneven channels
    return w.astype(dtype) if weight is None else quantize(w, get_format(weight), axis=1)


def _x(m, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(next(_seed)), (m, K)).astype(dtype)


def _check(y, ref, sizes, rtol):
    used = sum(sizes)
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "the kernel left output elements unwritten (NaN poison)"
    assert np.all(y[used:] == 0.0) and np.all(ref[used:] == 0.0), "padding rows must be exactly 0"
    err = np.linalg.norm(y[:used] - ref[:used]) / np.linalg.norm(ref[:used])
    assert err < rtol, err


@pytest.mark.parametrize("weight, cfg", [("int4-g128-asym", CFG), ("int4-g128-asym", CFG_SPLIT), ("int4", CFG),
                                         ("int8", CFG_SPLIT), (None, CFG)],
                         ids=["int4-g128-asym", "int4-g128-asym-splitk", "int4-channel-sym", "int8-channel-splitk",
                              "float"])
def test_kernel_matches_reference(weight, cfg):
    x, w = _x(40), _weights(len(SIZES), weight)
    sizes = jnp.asarray(SIZES, jnp.int32)
    y = gm.grouped_matmul(x, sizes, w, cfg)
    assert y.shape == (40, N) and y.dtype == x.dtype
    _check(y, gm.reference(x, sizes, w), SIZES, 1e-5)


def test_more_groups_than_rows():
    """Decode-sized batch: 3 rows over 4 experts (the schedule's tile count bound ``min(G, M)``)."""
    x, w = _x(3), _weights(4, "int8-g64-asym")
    sizes = (1, 0, 1, 1)
    y = gm.grouped_matmul(x, jnp.asarray(sizes, jnp.int32), w, CFG)
    _check(y, gm.reference(x, jnp.asarray(sizes, jnp.int32), w), sizes, 1e-5)


@pytest.mark.parametrize("weight", ["int4-g128-asym", None], ids=["int4-g128-asym", "bf16"])
def test_bf16_activations_give_bf16_output_to_bf16_precision(weight):
    x, w = _x(40, jnp.bfloat16), _weights(len(SIZES), weight, jnp.bfloat16)
    sizes = jnp.asarray(SIZES, jnp.int32)
    y = gm.grouped_matmul(x, sizes, w, CFG)
    assert y.dtype == jnp.bfloat16
    _check(y, gm.reference(x.astype(jnp.float32), sizes, w), SIZES, 1e-2)


@pytest.mark.parametrize("weight", ["int4-g128-asym", "int8", None])
def test_reference_matches_float64_row_loop(weight):
    x, w = _x(40), _weights(len(SIZES), weight)
    wd = np.asarray(w if weight is None else dequantize(w, jnp.float32), np.float64)
    xd = np.asarray(x, np.float64)
    want = np.zeros((40, N))
    group_of_row = np.repeat(np.arange(len(SIZES)), SIZES)
    for r, g in enumerate(group_of_row):
        want[r] = xd[r] @ wd[g]
    _check(gm.reference(x, jnp.asarray(SIZES, jnp.int32), w), want, SIZES, 1e-6)


def test_mixed_precision_groups_match_per_expert_reference():
    sizes = (5, 0, 9, 17, 3, 2)  # 36 of 44 rows used
    groups = [((3, 0), _weights(2, "int4-g128-asym")),  # expert order within a group is free
              ((5, 1), _weights(2, "int8")),
              ((2, 4), _weights(2, None))]
    x = _x(44)
    y = gm.mixed_grouped_matmul(x, jnp.asarray(sizes, jnp.int32), groups, CFG)
    per_expert = [None] * len(sizes)
    for ids, w in groups:
        wd = w if isinstance(w, jax.Array) else dequantize(w, jnp.float32)
        for j, e in enumerate(ids):
            per_expert[e] = wd[j]
    _check(y, gm.reference(x, jnp.asarray(sizes, jnp.int32), jnp.stack(per_expert)), sizes, 1e-5)


def test_bad_inputs_raise_clear_errors():
    x, w = _x(8), _weights(4, "int4-g128-asym")
    sizes = jnp.asarray([2, 2, 2, 2], jnp.int32)
    with pytest.raises(ValueError, match="x has K=128 but w has K=256"):
        gm.check(x[:, :128], sizes, w, CFG)
    with pytest.raises(ValueError, match="group_sizes has G=3 groups but w has G=4"):
        gm.check(x, sizes[:3], w, CFG)
    with pytest.raises(ValueError, match="group_sizes must be a 1-D int32"):
        gm.check(x, sizes.astype(jnp.float32), w, CFG)
    with pytest.raises(ValueError, match="x must be bfloat16, float16 or float32"):
        gm.check(x.astype(jnp.int32), sizes, w, CFG)
    with pytest.raises(ValueError, match="float w must have x's dtype float32, got bfloat16"):
        gm.check(x, sizes, jnp.ones((4, K, N), jnp.bfloat16), CFG)
    with pytest.raises(ValueError, match="IntFormat QArray of"):
        gm.check(x, sizes, quantize(jnp.ones((4, K, N)), "nvfp4", axis=1), CFG)
    with pytest.raises(ValueError, match="quantized along axis 1"):
        gm.check(x, sizes, quantize(jnp.ones((4, K, N)), "int8", axis=2), CFG)
    with pytest.raises(ValueError, match="block_k=256 must divide the group size 128"):
        gm.check(x, sizes, w, TileConfig(16, 64, 256))
    with pytest.raises(ValueError, match="N=128 is not a multiple of block_n=256"):
        gm.check(x, sizes, w, TileConfig(16, 256, 64))
    with pytest.raises(ValueError, match="block_m=8 must be at least 16"):
        gm.check(x, sizes, w, TileConfig(8, 64, 64))
    w8 = _weights(2, "int8")
    with pytest.raises(ValueError, match=r"missing \[3\], repeated \[1\]"):
        gm.check_mixed(x, sizes, [gm.ExpertGroup((0, 1), w8), gm.ExpertGroup((1, 2), w8)], CFG)
    with pytest.raises(ValueError, match=r"groups\[1\].weights has G=2 experts but expert_ids lists 1"):
        gm.check_mixed(x, sizes, [gm.ExpertGroup((0, 1), w8), gm.ExpertGroup((2,), w8)], CFG)
    with pytest.raises(ValueError, match=r"expert_ids must be a non-empty tuple of ints in \[0, 4\)"):
        gm.mixed_grouped_matmul(x, sizes, [((0, 1), w8), ((2, 4), w8)], CFG)
