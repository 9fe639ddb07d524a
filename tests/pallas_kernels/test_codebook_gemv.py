"""The codebook (VQ) GEMV kernel in interpret mode against its pure-jnp reference.

Fresh random weights, codebooks and inputs per test; interpret mode poisons outputs
with NaN first, so a finite result proves every output element was written.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.formats import CodebookFormat, codebook_quantize
from jquant.pallas_kernels import codebook_gemv, registry
from jquant.pallas_kernels._common import TileConfig

_seed = itertools.count(7000)
CFG = TileConfig(1, 32, 64, 1, 4, 2)


def _weight(fmt, grid=(1, 1), k=256, n=128):
    kw, kb = jax.random.split(jax.random.PRNGKey(next(_seed)))
    w = jax.random.normal(kw, (k, n))
    books = jax.random.normal(kb, grid + (fmt.num_codebooks, fmt.codebook_size, fmt.vector_dim))
    return codebook_quantize(w, books / fmt.num_codebooks, fmt, axis=0)


def _err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "unwritten output elements (NaN poison)"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("fmt, grid", [
    (CodebookFormat(vector_dim=4, index_bits=8), (1, 1)),
    (CodebookFormat(vector_dim=2, index_bits=8, num_codebooks=2, group_size=64), (1, 1)),
    (CodebookFormat(vector_dim=8, index_bits=16), (1, 1)),
    (CodebookFormat(vector_dim=1, index_bits=8), (1, 1)),
    (CodebookFormat(vector_dim=4, index_bits=8, codebook_rows=64, codebook_cols=64), (4, 2)),
], ids=["d4k8", "d2k8x2-g64", "d8k16", "d1k8", "d4k8-grid4x2"])
@pytest.mark.parametrize("m", [1, 3])
def test_codebook_gemv_matches_reference(fmt, grid, m):
    w = _weight(fmt, grid)
    x = jax.random.normal(jax.random.PRNGKey(next(_seed)), (m, 256))
    assert _err(codebook_gemv.codebook_gemv(x, w, CFG), codebook_gemv.reference(x, w)) < 1e-5


def test_bf16_activations_and_registry_candidates():
    w = _weight(CodebookFormat(vector_dim=4, index_bits=8))
    x = jax.random.normal(jax.random.PRNGKey(next(_seed)), (2, 256), jnp.bfloat16)
    spec = registry.kernel_for(w, None)
    assert spec.name == codebook_gemv.NAME and registry.case_for(w, None) == "vq-d4-k8"
    cfg = registry.candidate_configs(spec.name, 2)[0]
    y = spec.run(x, w, None, cfg)
    assert y.dtype == jnp.bfloat16 and _err(y, spec.reference(x.astype(jnp.float32), w, None)) < 1e-2
    assert registry.candidate_configs(spec.name, 9) == []


def test_linear_through_the_kernel_matches_the_xla_path():
    w = _weight(CodebookFormat(vector_dim=2, index_bits=8))
    x = jax.random.normal(jax.random.PRNGKey(next(_seed)), (1, 3, 256))
    with jq.ops.force_path("xla"):
        ref = jq.ops.linear(x, w)
    with jq.ops.force_path("pallas"), jq.ops.record_dispatch() as rec:
        got = jq.ops.linear(x, w)
    assert rec[0].path == codebook_gemv.NAME, rec[0].reason
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)
    with jq.ops.force_path("pallas"), jq.ops.record_dispatch() as rec:  # M = 12 > 8: XLA fallback
        jq.ops.linear(jnp.ones((12, 256)), w)
    assert rec[0].path == "xla-dequantize"


def test_bad_inputs_raise_clear_errors():
    w = _weight(CodebookFormat(vector_dim=4, index_bits=8))
    x = jnp.ones((1, 256))
    with pytest.raises(ValueError, match="M=9 rows"):
        codebook_gemv.check(jnp.ones((9, 256)), w, CFG)
    with pytest.raises(ValueError, match="N=128 is not a multiple of block_n=256"):
        codebook_gemv.check(x, w, TileConfig(1, 256, 64))
    with pytest.raises(ValueError, match="block_k=512 must divide K=256"):
        codebook_gemv.check(x, w, TileConfig(1, 32, 512))
    with pytest.raises(ValueError, match="8, 16\\)-bit indices"):
        codebook_gemv.check(x, _weight(CodebookFormat(vector_dim=2, index_bits=4)), CFG)
