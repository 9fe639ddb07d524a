"""The packed-KV decode attention kernel (interpret mode) equals the segment-wise reference
``jquant.kv.decode_attention.decode_attention`` on fresh random caches, and refuses what it cannot read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.kv import KVCacheConfig, KVQuantizer, init_cache
from jquant.kv.decode_attention import decode_attention
from jquant.pallas_kernels.kv_decode_attention import kv_decode_attention, supports

CONFIGS = {
    "k4v4-g32": KVCacheConfig(key=KVQuantizer(bits=4, group_size=32), value=KVQuantizer(bits=4, group_size=32)),
    "k2v2-sink-window": KVCacheConfig(key=KVQuantizer(bits=2, group_size=16), value=KVQuantizer(bits=2, group_size=32),
                                      sink=4, window=8),
    "k4v2-head": KVCacheConfig(key=KVQuantizer(bits=4, group_size=64), value=KVQuantizer(bits=2, group_size=8,
                                                                                         meta_dtype="bfloat16")),
    "k8v4-past-only": KVCacheConfig(key=KVQuantizer(bits=8, group_size=64), value=KVQuantizer(bits=4, group_size=16),
                                    past_only=True, window=3),
}


def _filled(cfg, *, batch, capacity, kv_heads, head_dim, steps, seed):
    rng = np.random.default_rng(seed)
    layer = init_cache(num_layers=1, batch=batch, capacity=capacity, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=jnp.float32, configs=cfg).layers[0]
    kv = jnp.asarray(rng.standard_normal((2, batch, capacity, kv_heads, head_dim)) * 1.5, jnp.float32)
    update = jax.jit(type(layer).update)
    start = 0
    for n in steps:
        layer, _, _ = update(layer, kv[0, :, start:start + n], kv[1, :, start:start + n], jnp.asarray(start))
        start += n
    return layer, kv, start, rng


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("heads", [2, 6])
def test_kernel_equals_reference(name, heads):
    cfg = CONFIGS[name]
    kv_heads, head_dim = 2, 64
    layer, kv, length, rng = _filled(cfg, batch=2, capacity=150, kv_heads=kv_heads, head_dim=head_dim,
                                     steps=(97, 1, 1, 30), seed=len(name) + heads)
    q = jnp.asarray(rng.standard_normal((2, 1, heads, head_dim)) * 2, jnp.float32)
    current = (kv[0, :, length - 1:length], kv[1, :, length - 1:length])
    want = decode_attention(q, layer, jnp.asarray(length), current=current)
    got = kv_decode_attention(q, layer, jnp.asarray(length), current=current, block_tokens=32, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_a_partly_filled_cache_ignores_stale_rows():
    """Rows beyond the cached length hold zeros from init and must not be read: lengths 1 and 40 of capacity 128."""
    cfg = CONFIGS["k4v4-g32"]
    for steps in ((1,), (33, 7)):
        layer, kv, length, rng = _filled(cfg, batch=1, capacity=128, kv_heads=1, head_dim=64, steps=steps, seed=3)
        q = jnp.asarray(rng.standard_normal((1, 1, 4, 64)), jnp.float32)
        want = decode_attention(q, layer, jnp.asarray(length))
        got = kv_decode_attention(q, layer, jnp.asarray(length), block_tokens=16, interpret=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cfg, words", [
    (KVCacheConfig(key=KVQuantizer(bits=2, axis="channel", group_size=8), value=KVQuantizer(bits=2, group_size=16)),
     "token-axis"),
    (KVCacheConfig(key=KVQuantizer(bits=3, group_size=16), value=KVQuantizer(bits=4, group_size=16)), "3 bits"),
    (KVCacheConfig(key=KVQuantizer(bits=4, group_size=16), value=None), "both keys and values"),
])
def test_unsupported_caches_are_named_and_refused(cfg, words):
    layer = init_cache(num_layers=1, batch=1, capacity=16, kv_heads=1, head_dim=32, dtype=jnp.float32,
                       configs=cfg).layers[0]
    assert words in supports(layer)
    with pytest.raises(ValueError, match="decode_attention"):
        kv_decode_attention(jnp.zeros((1, 1, 2, 32)), layer, jnp.asarray(8), interpret=True)
