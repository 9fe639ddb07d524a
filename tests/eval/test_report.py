"""Size counting against numpy/nnx references, and latency measurement."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jquant.eval.report import dtype_bits, measure_latency, param_bytes, param_count


def test_standard_dtypes_count_their_nbytes() -> None:
    tree = {"w": jnp.ones((3, 5)), "b": jnp.ones((5,), jnp.bfloat16),
            "q": {"codes": np.zeros((4, 8), np.uint8), "scale": jnp.ones((4,), jnp.float16)},
            "meta": (None, 3, "name")}
    arrays = [tree["w"], tree["b"], tree["q"]["codes"], tree["q"]["scale"]]
    assert param_bytes(tree) == sum(a.nbytes for a in arrays)
    assert param_count(tree) == sum(a.size for a in arrays)


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4, ml_dtypes.float4_e2m1fn])
def test_sub_byte_dtypes_count_packed_bits(dtype) -> None:
    x = jnp.zeros((7, 3), dtype)  # 21 elements -> 10.5 bytes, rounded up
    assert dtype_bits(dtype) == 4
    assert param_bytes(x) == math.ceil(jnp.zeros((7, 3), jnp.int8).nbytes / 2)
    assert param_count(x) == 21


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(6, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.rngs = rngs  # RNG state is not a model size


def test_module_counts_its_state_without_rng_state() -> None:
    model = Net(nnx.Rngs(0, dropout=1))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert param_bytes(model) == sum(p.nbytes for p in params)
    assert param_count(model) == sum(p.size for p in params)
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0, dropout=1)))
    assert param_bytes(abstract) == param_bytes(model)


def test_measure_latency_blocks_and_times_every_iteration() -> None:
    calls = []

    def fn(x: jax.Array) -> jax.Array:
        calls.append(1)
        time.sleep(0.002)
        return x + 1

    result = measure_latency(fn, jnp.ones(3), warmup=1, iters=5)
    assert len(calls) == 6 and result.iters == 5
    assert 2.0 <= result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms
    with pytest.raises(ValueError, match="iters"):
        measure_latency(fn, jnp.ones(3), iters=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(fn, jnp.ones(3), warmup=-1)
