"""decode_attention (segment-wise read of a quantized cache) equals attention over the cache's merged read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops
from jquant.kv import KVCacheConfig, KVQuantizer, init_cache
from jquant.kv.decode_attention import decode_attention
from jquant.models.layers import RopeConfig, apply_rope, rope_cos_sin, rope_inverse_frequencies

B, H, K, D, S = 2, 4, 2, 16, 40
C = K * D
PERM = tuple(int(i) for i in np.random.default_rng(0).permutation(C))
CONFIGS = {
    "rtn": KVCacheConfig(key=KVQuantizer(bits=4, group_size=D), value=KVQuantizer(bits=2, group_size=8)),
    "kivi": KVCacheConfig(key=KVQuantizer(bits=2, axis="channel", group_size=8), value=KVQuantizer(bits=2, group_size=16)),
    "skvq-pre-rope": KVCacheConfig(key=KVQuantizer(bits=2, group_sizes=(9, 7, 16), perm=PERM, clip=0.9,
                                                   meta_dtype="float8_e4m3fn"),
                                   value=KVQuantizer(bits=1.5, group_size=8), window=6, sink=3, pre_rope=True),
    "poq": KVCacheConfig(key=KVQuantizer(bits=3, group_size=D), value=KVQuantizer(bits=3, group_size=D), past_only=True),
}


def _rope(keys, positions):
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(D, RopeConfig()), keys.dtype)
    return apply_rope(keys, cos, sin)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_segment_read_equals_merged_read(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(1)
    layer = init_cache(num_layers=1, batch=B, capacity=S, kv_heads=K, head_dim=D, dtype=jnp.float32,
                       configs=cfg).layers[0]
    kv = jnp.asarray(rng.standard_normal((2, B, S, K, D)) * 2, jnp.float32)
    update = jax.jit(type(layer).update)
    start = 0
    for n in (17, 1, 5, 1, 1):
        layer, k_all, v_all = update(layer, kv[0, :, start:start + n], kv[1, :, start:start + n], jnp.asarray(start))
        start += n
    length = jnp.asarray(start)
    q = jnp.asarray(rng.standard_normal((B, 1, H, D)), jnp.float32)
    transform = _rope if cfg.pre_rope else None
    current = (kv[0, :, start - 1:start], kv[1, :, start - 1:start])
    got = decode_attention(q, layer, length, current=current, key_transform=transform)
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    keys = _rope(k_all, pos) if cfg.pre_rope else k_all
    mask = jnp.broadcast_to(jnp.arange(S) < start, (B, 1, S))
    want = ops.attention(q, keys, v_all, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    exact = ops.attention(q, _rope(kv[0], pos) if cfg.pre_rope else kv[0], kv[1], mask)
    assert np.abs(np.asarray(got) - np.asarray(exact)).max() > 1e-3  # the quantized segment is really read


def test_decode_attention_needs_current_for_past_only():
    layer = init_cache(num_layers=1, batch=1, capacity=8, kv_heads=K, head_dim=D, dtype=jnp.float32,
                       configs=CONFIGS["poq"]).layers[0]
    with pytest.raises(ValueError, match="current"):
        decode_attention(jnp.zeros((1, 1, H, D)), layer, jnp.asarray(1))
