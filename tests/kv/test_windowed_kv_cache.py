"""Quantized KV caches with sink and window tokens, channel-wise blocks, pre-RoPE keys, smoothing and past-only
attention: decoding token by token with the real cache equals the simulated full-sequence pass, every token is
quantized exactly once from its own value, and the cache's memory is what its arrays hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.kv import KVCacheConfig, KVQuantizer, LayerKVCache, init_cache
from jquant.models import llama
from jquant.kv.smoothing import KVSmoothing
from jquant.testing.tiny_models import peaked_random_llama, fast_cached_logits, fast_logits

VOCAB = 97
CFG = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)
K, D = CFG.num_kv_heads, CFG.head_dim  # 2, 16
C = K * D
SEQ = 14


def _model(seed):
    return peaked_random_llama(CFG, seed)


def _perm(seed):
    return tuple(int(i) for i in np.random.default_rng(seed).permutation(C))


CONFIGS = {
    "rtn-k2v2": KVCacheConfig(key=KVQuantizer(bits=2, group_size=D), value=KVQuantizer(bits=2, group_size=D)),
    "kivi-k2v2": KVCacheConfig(key=KVQuantizer(bits=2, axis="channel", group_size=4),
                               value=KVQuantizer(bits=2, group_size=D)),
    "skvq-k2v1.5": KVCacheConfig(
        key=KVQuantizer(bits=2, group_sizes=(7, 9, 10, 6), perm=_perm(1), clip=0.92, meta_dtype="float8_e4m3fn"),
        value=KVQuantizer(bits=1.5, group_sizes=(12, 4, 16), perm=_perm(2), clip=0.92, meta_dtype="float8_e4m3fn"),
        window=3, sink=2, pre_rope=True),
    "wkvquant-k4v4-poq": KVCacheConfig(key=KVQuantizer(bits=4, group_size=D), value=KVQuantizer(bits=4, group_size=D),
                                       past_only=True),
    "keys-only-window-kivi": KVCacheConfig(key=KVQuantizer(bits=3, axis="channel", group_size=3), window=2, sink=1),
}


def _configured(model, cfg, *, smoothing=False, seed=0):
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    rng = np.random.default_rng(seed)
    for layer in out.layers:
        layer.self_attn.kv_cache = cfg
        if smoothing:
            layer.self_attn.kv_smoothing = KVSmoothing(
                *(jnp.asarray(a, jnp.float32) for a in (rng.standard_normal(C), rng.uniform(0.5, 2, C),
                                                         rng.standard_normal(C), rng.uniform(0.5, 2, C))))
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def model():
    return _model(0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_token_by_token_decoding_equals_simulated_pass(model, name):
    quantized = _configured(model, CONFIGS[name], smoothing=name.startswith("wkvquant"))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (2, SEQ)), jnp.int32)
    simulated = fast_logits(quantized, tokens)
    decoded, cache = fast_cached_logits(quantized, tokens, (1,) * SEQ)
    assert _rel(decoded, simulated) < 1e-5
    assert _rel(simulated, fast_logits(model, tokens)) > 1e-3  # the quantization is really there
    assert all(layer.config == CONFIGS[name] for layer in cache.layers)


def test_prefill_then_decode_with_past_only(model):
    """A prefill chunk attends to itself in full precision (POQ); later tokens read it quantized."""
    cfg = CONFIGS["wkvquant-k4v4-poq"]
    quantized = _configured(model, cfg)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, VOCAB, (1, SEQ)), jnp.int32)
    logits, _ = fast_cached_logits(quantized, tokens, (6,) + (1,) * (SEQ - 6))
    float_logits = fast_logits(model, tokens)
    assert _rel(logits[:, :6], float_logits[:, :6]) < 1e-5  # the prompt saw exact keys and values
    assert _rel(logits[:, 6:], float_logits[:, 6:]) > 1e-3


def test_everything_inside_sink_and_window_is_exact(model):
    cfg = KVCacheConfig(key=KVQuantizer(bits=2, group_size=D), value=KVQuantizer(bits=2, group_size=D),
                        window=5, sink=3)
    quantized = _configured(model, cfg)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, VOCAB, (2, 8)), jnp.int32)
    float_logits = fast_logits(model, tokens)
    assert _rel(fast_cached_logits(quantized, tokens, (1,) * 8)[0], float_logits) < 1e-5
    # a cache shorter than sink + window (generation from a short prompt) holds everything exactly
    assert _rel(fast_cached_logits(quantized, tokens, (1,) * 8, capacity=8)[0], float_logits) < 1e-5
    assert _rel(fast_logits(quantized, tokens), float_logits) < 1e-5


@pytest.mark.parametrize("name", ["skvq-k2v1.5", "kivi-k2v2", "keys-only-window-kivi"])
def test_each_token_is_quantized_once_from_its_own_value(name):
    """Chunked writes leave exactly the packed rows that quantizing each token (or block) directly gives."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(10)
    k_all = jnp.asarray(rng.standard_normal((2, 16, K, D)) * 3, jnp.float32)
    v_all = jnp.asarray(rng.standard_normal((2, 16, K, D)), jnp.float32)
    layer = init_cache(num_layers=1, batch=2, capacity=16, kv_heads=K, head_dim=D, dtype=jnp.float32,
                       configs=cfg).layers[0]
    update = jax.jit(LayerKVCache.update)
    start = 0
    for n in (5, 1, 1, 4, 1, 1):
        layer, _, _ = update(layer, k_all[:, start:start + n], v_all[:, start:start + n], jnp.asarray(start))
        start += n
    for q, store, full in ((cfg.key, layer.k, k_all), (cfg.value, layer.v, v_all)):
        if q is None:
            continue
        end = int(cfg.quantized_end(q, start))
        assert end > cfg.sink
        direct = q.encode(full[:, cfg.sink:end])
        rows = (end - cfg.sink) // q.block
        stored = store.packed.arrays()
        for n_, a in direct.arrays().items():
            np.testing.assert_array_equal(np.asarray(stored[n_][:, :rows]), np.asarray(a), err_msg=n_)
            assert not np.asarray(stored[n_][:, rows:]).any()  # later rows never written
        if cfg.sink:
            np.testing.assert_array_equal(np.asarray(store.sink), np.asarray(full[:, :cfg.sink]))
        if store.recent is not None:  # the last R tokens, exact, in position order
            r = store.recent.shape[1]
            assert r == cfg.recent_length(q)
            np.testing.assert_array_equal(np.asarray(store.recent), np.asarray(full[:, start - r:start]))


def test_memory_is_what_the_arrays_hold():
    cfg = CONFIGS["skvq-k2v1.5"]
    cache = init_cache(num_layers=3, batch=2, capacity=40, kv_heads=K, head_dim=D, dtype=jnp.bfloat16, configs=cfg)
    rows = 40 - cfg.sink
    per_layer = (rows * 2 * (C * 2 // 8 + 2 * 4)  # keys: 2-bit codes + fp8 scale/zero for 4 groups
                 + rows * 2 * (-(-C // 5) + 2 * 3)  # values: trits + 3 groups
                 + 2 * 2 * (cfg.sink + cfg.window) * C * 2)  # bf16 sink and window of keys and values
    assert cache.nbytes == 3 * per_layer
    assert cache.bits_per_element() == pytest.approx(8 * cache.nbytes / (3 * 2 * 2 * 40 * C))
    dense = init_cache(num_layers=3, batch=2, capacity=40, kv_heads=K, head_dim=D, dtype=jnp.bfloat16)
    assert dense.bits_per_element() == 16.0


def test_bad_cache_settings_are_named(model):
    cfg = KVCacheConfig(key=KVQuantizer(bits=2, group_size=D), window=30)
    with pytest.raises(ValueError, match="window=30 tokens exceed the model's context of 16"):
        init_cache(num_layers=1, batch=1, capacity=8, kv_heads=K, head_dim=D, dtype=jnp.float32, configs=cfg,
                   max_context=16)
    long_window = _configured(model, KVCacheConfig(key=KVQuantizer(bits=2, group_size=D), window=CFG.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="exceed the model's context"):
        long_window.init_cache(1, 8)
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        init_cache(num_layers=1, batch=1, capacity=16, kv_heads=K, head_dim=D, dtype=jnp.float32,
                   configs=KVCacheConfig(key=KVQuantizer(bits=2, group_size=24)))
    with pytest.raises(ValueError, match="window must be a non-negative int"):
        KVCacheConfig(window=-1)
    other = init_cache(num_layers=1, batch=1, capacity=16, kv_heads=4, head_dim=D, dtype=jnp.float32,
                       configs=CONFIGS["rtn-k2v2"]).layers[0]
    with pytest.raises(ValueError, match=r"holds \(4, 16\).*model.init_cache"):
        other.update(jnp.zeros((1, 1, K, D)), jnp.zeros((1, 1, K, D)), jnp.asarray(0))
