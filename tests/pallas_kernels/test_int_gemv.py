"""The decode GEMV kernel (``pallas_kernels/int_gemv.py``) in interpret mode against its reference.

Fresh random inputs per test; interpret mode poisons outputs with NaN first (checked in
test_kernels.py), so a finite result proves every output element was written.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import quantize
from jquant.pallas_kernels import int_gemv, registry
from jquant.pallas_kernels._common import TileConfig

_seed = itertools.count(5000)


def _inputs(m, k, n, weight, dtype=jnp.float32):
    kw, kx, kc = jax.random.split(jax.random.PRNGKey(next(_seed)), 3)
    w = jax.random.normal(kw, (k, n)) * jnp.exp(jax.random.normal(kc, (1, n)))
    return jax.random.normal(kx, (m, k)).astype(dtype), quantize(w, weight, axis=0)


def _err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "unwritten output elements (NaN poison)"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


FMA = TileConfig(1, 32, 64, 1, 4, 2)
FMA_MULTI_GROUP = TileConfig(1, 64, 128, 1, 4, 2)  # one step spans two 64-row groups
DOT = TileConfig(16, 32, 64, 1, 4, 2)
DOT_MULTI_GROUP = TileConfig(16, 64, 128, 1, 4, 2)


@pytest.mark.parametrize("weight", ["int4-g64", "int4-g64-asym", "int4", "int8", "int8-g64-asym", "int8-g32"])
@pytest.mark.parametrize("m, cfg", [(1, FMA), (3, FMA_MULTI_GROUP), (2, DOT), (16, DOT_MULTI_GROUP)],
                         ids=["fma-m1", "fma-m3-2groups", "dot-m2", "dot-m16-2groups"])
def test_gemv_matches_reference(weight, m, cfg):
    x, w = _inputs(m, 256, 128, weight)
    assert _err(int_gemv.int_gemv(x, w, cfg), int_gemv.reference(x, w)) < 1e-5


@pytest.mark.parametrize("cfg", [FMA, DOT], ids=["fma", "dot"])
def test_bf16_activations_give_bf16_output_to_bf16_precision(cfg):
    x, w = _inputs(5 if cfg.block_m == 16 else 1, 256, 128, "int4-g64-asym", jnp.bfloat16)
    y = int_gemv.int_gemv(x, w, cfg)
    assert y.dtype == jnp.bfloat16
    assert _err(y, int_gemv.reference(x.astype(jnp.float32), w)) < 1e-2


def test_registry_candidates_run_and_only_decode_batches_fit():
    x, w = _inputs(1, 512, 128, "int4-g128")
    spec = registry.get(int_gemv.NAME)
    cfg = registry.candidate_configs(int_gemv.NAME, 1)[0]
    spec.check(x, w, None, cfg)
    assert _err(spec.run(x, w, None, cfg), spec.reference(x, w, None)) < 1e-5
    assert registry.candidate_configs(int_gemv.NAME, 17) == []
    assert registry.kernel_for(w, None).name != int_gemv.NAME  # decode-only: never the general pick


def test_bad_inputs_raise_clear_errors():
    x, w = _inputs(4, 256, 128, "int4-g64")
    with pytest.raises(ValueError, match="block_m must be 1"):
        int_gemv.check(x, w, TileConfig(8, 32, 64))
    with pytest.raises(ValueError, match="M=17 rows"):
        int_gemv.check(jnp.ones((17, 256)), w, DOT)
    with pytest.raises(ValueError, match="M=9 rows"):
        int_gemv.check(jnp.ones((9, 256)), w, FMA)
    with pytest.raises(ValueError, match="N=128 is not a multiple of block_n=256"):
        int_gemv.check(x, w, TileConfig(1, 256, 64))
    with pytest.raises(ValueError, match="block_k=512 must divide K=256"):
        int_gemv.check(x, w, TileConfig(1, 32, 512))
    with pytest.raises(ValueError, match="K=128 but the weight has K=256"):
        int_gemv.check(x[:, :128], w, FMA)
    with pytest.raises(ValueError, match="IntFormat weight"):
        int_gemv.check(x, quantize(jnp.ones((256, 128)), "nvfp4", axis=0), FMA)
