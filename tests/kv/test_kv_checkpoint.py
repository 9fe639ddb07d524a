"""A model whose attention layers quantize their KV cache (SKVQ-style groups, WKVQuant smoothing) saves and loads."""

import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant.kv import KVCacheConfig, KVQuantizer
from jquant.kv.serialize import config_from_dict, config_to_dict
from jquant.models import llama
from jquant.kv.smoothing import KVSmoothing
from jquant.testing.tiny_models import fast_logits

CFG = llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
C = CFG.num_kv_heads * CFG.head_dim


def test_save_load_keeps_kv_configs_and_smoothing(tmp_path):
    rng = np.random.default_rng(0)
    model = llama.init_model(CFG, __import__("jax").random.key(0))
    perm = tuple(int(i) for i in rng.permutation(C))
    skvq_like = KVCacheConfig(key=KVQuantizer(bits=2, group_sizes=(10, 6, 16), perm=perm, clip=0.9,
                                              meta_dtype="float8_e4m3fn"),
                              value=KVQuantizer(bits=1.5, group_size=16), window=4, sink=2, pre_rope=True)
    poq = KVCacheConfig(key=KVQuantizer(bits=4, axis="channel", group_size=4), value=KVQuantizer(bits=4, group_size=16),
                        past_only=True)
    model.layers[0].self_attn.kv_cache = skvq_like
    model.layers[1].self_attn.kv_cache = poq
    model.layers[1].self_attn.kv_smoothing = KVSmoothing(*(jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32)
                                                           for _ in range(4)))
    assert config_from_dict(config_to_dict(skvq_like)) == skvq_like
    jq.save(model, tmp_path / "ckpt")
    loaded = jq.load(tmp_path / "ckpt")
    assert loaded.layers[0].self_attn.kv_cache == skvq_like and loaded.layers[1].self_attn.kv_cache == poq
    assert loaded.layers[0].self_attn.kv_smoothing is None
    for name in ("k_shift", "k_scale", "v_shift", "v_scale"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.layers[1].self_attn.kv_smoothing, name).get_value()),
                                      np.asarray(getattr(model.layers[1].self_attn.kv_smoothing, name).get_value()))
    tokens = jnp.asarray(rng.integers(0, 97, (2, 12)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(fast_logits(loaded, tokens)), np.asarray(fast_logits(model, tokens)))
    float_model = llama.init_model(CFG, __import__("jax").random.key(0))
    jq.save(float_model, tmp_path / "float")
    assert not (tmp_path / "float" / "kv_cache.json").exists()
    assert all(layer.self_attn.kv_cache is None for layer in jq.load(tmp_path / "float").layers)
