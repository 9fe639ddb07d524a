"""Parameter initialisation: normal draws of the right scale, the same traced and eager, and one generator
program per size bucket rather than per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import monitoring
from jquant.models.layers import Embed, Linear, _normal_init


def test_draws_are_standard_normal_times_std_and_independent_across_keys():
    key = jax.random.key(np.random.default_rng().integers(1 << 31))
    a = np.asarray(_normal_init(key, (300, 70), jnp.float32, 0.02), np.float64).ravel()
    b = np.asarray(_normal_init(jax.random.fold_in(key, 1), (300, 70), jnp.float32, 0.02), np.float64).ravel()
    n = a.size
    assert abs(a.mean()) < 4 * 0.02 / np.sqrt(n)
    assert abs(a.std() / 0.02 - 1) < 4 / np.sqrt(2 * n)
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(n)
    # the entries of one draw are not correlated with their neighbours either (the prefix of a longer flat draw)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 4 / np.sqrt(n)


@pytest.mark.parametrize("shape", [(1,), (5, 3), (64, 64), (3, 7, 11)])
def test_traced_draw_equals_the_eager_one(shape):
    key = jax.random.key(7)
    eager = _normal_init(key, shape, jnp.float32, 0.5)
    traced = jax.jit(lambda k: _normal_init(k, shape, jnp.float32, 0.5))(key)
    assert eager.shape == shape
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))


def test_shapes_of_one_size_bucket_compile_the_generator_once():
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a persistent-cache hit would hide a compile
    try:
        rngs = nnx.Rngs(3)
        Linear(37, 29, use_bias=False, sharding=(None, None), param_dtype=jnp.float32, rngs=rngs)  # 1073 -> 2048
        before = len(compiled)
        Linear(41, 31, use_bias=False, sharding=(None, None), param_dtype=jnp.float32, rngs=rngs)  # 1271 -> 2048
        Embed(45, 33, param_dtype=jnp.float32, rngs=rngs)  # 1485 -> 2048
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        monitoring.unregister_event_duration_listener(listen)
    assert not any("normal" in str(name) for name in compiled[before:]), compiled[before:]
