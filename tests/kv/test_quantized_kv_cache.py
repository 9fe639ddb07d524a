"""The quantized KV cache: storage, exact writes, and cached decoding equal to the un-cached KV-quantized forward.

A layer with a Format ``kv_cache`` (``KVCacheConfig.of_format``) quantizes keys (after RoPE and the optional q/k rotation) and values per
token and head in the un-cached forward; ``model.init_cache`` then stores that format, and a cached
prefill/decode must give the same logits. References are computed directly with ``jquant.formats``
on fresh random inputs.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.formats import QArray, dequantize, get_format, quantize
from jquant.kv import KVCache, KVCacheConfig, LayerKVCache, init_cache
from jquant.models import llama
from jquant.testing.tiny_models import peaked_random_llama, fast_cached_logits, fast_logits

VOCAB = 97
CFG = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)
HEAD_DIM = CFG.head_dim  # 16
SEQ = 12


# ---- helpers -----------------------------------------------------------------------------------------
def _random_model(seed, cfg=CFG):
    return peaked_random_llama(cfg, seed)


def _with_kv(model, fmt, *, qk_rotation=False):
    """A copy of ``model`` whose every attention layer quantizes keys/values with ``fmt`` (None: float)."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    for layer in out.layers:
        layer.self_attn.kv_cache = None if fmt is None else KVCacheConfig.of_format(fmt)
        layer.self_attn.qk_rotation = qk_rotation
    return out


def _tokens(seed, batch=2, length=SEQ):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)), jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nbytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def model():
    return _random_model(0)


# ---- 1: storage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bits", [("int4-asym", 4), ("int8-asym", 8)])
def test_quantized_cache_storage_and_size(name, bits):
    kw = dict(num_layers=2, batch=3, capacity=10, kv_heads=2, head_dim=HEAD_DIM, dtype=jnp.float32)
    cache = init_cache(**kw, configs=name)
    dense = init_cache(**kw)
    assert isinstance(cache, KVCache) and int(cache.length) == 0 and cache.capacity == 10
    for layer in cache.layers:
        assert layer.config == KVCacheConfig.of_format(name)
        for store in (layer.k, layer.v):
            slot = store.packed
            assert store.dense is None and store.sink is None and store.recent is None
            assert isinstance(slot, QArray) and slot.format == get_format(name) and slot.shape == (3, 10, 2, HEAD_DIM)
            slot.validate()
            assert slot.codes.dtype == jnp.uint8
            assert slot.codes.shape == (3, 10, 2, HEAD_DIM * bits // 8)  # packed along the head dim
            assert slot.scales.shape == slot.zeros.shape == (3, 10, 2, 1)  # one per token and head
    for layer in dense.layers:
        assert layer.config is None and layer.k.dense.dtype == jnp.float32 and layer.k.dense.shape == (3, 10, 2, HEAD_DIM)
    quantized_bytes, dense_bytes = _nbytes(cache.layers), _nbytes(dense.layers)
    assert quantized_bytes == cache.nbytes and dense_bytes == dense.nbytes
    assert dense_bytes == 2 * 2 * 3 * 10 * 2 * HEAD_DIM * 4
    assert quantized_bytes < dense_bytes * (bits + 2) / 32  # codes plus at most 2 bits/element of scales, zeros


def test_per_layer_formats():
    kw = dict(num_layers=2, batch=1, capacity=4, kv_heads=2, head_dim=HEAD_DIM, dtype=jnp.float32)
    cache = init_cache(**kw, configs=(None, get_format("int4-asym")))
    assert cache.layers[0].config is None and cache.layers[0].k.packed is None
    assert cache.layers[1].config == KVCacheConfig.of_format("int4-asym")
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        init_cache(**kw, configs=("int4-asym",) * 3)


# ---- 2: LayerKVCache.update -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int4-asym", "int8-asym"])
def test_update_writes_dequantize_of_quantize(name):
    fmt = get_format(name)
    rng = np.random.default_rng(1)
    layer = init_cache(num_layers=1, batch=2, capacity=10, kv_heads=2, head_dim=HEAD_DIM, dtype=jnp.float32,
                       configs=name).layers[0]
    empty_k = np.asarray(dequantize(layer.k.packed))

    def rand(t):
        return jnp.asarray(rng.standard_normal((2, t, 2, HEAD_DIM)) * rng.uniform(0.1, 3.0, (2, t, 2, 1)), jnp.float32)

    k0, v0, k1, v1 = rand(4), rand(4), rand(3), rand(3)
    first, k_all0, v_all0 = layer.update(k0, v0, jnp.asarray(0, jnp.int32))
    second, k_all1, v_all1 = jax.jit(LayerKVCache.update)(first, k1, v1, jnp.asarray(4, jnp.int32))
    assert isinstance(second, LayerKVCache) and second.config == KVCacheConfig.of_format(fmt)
    for new0, new1, all0, all1 in ((k0, k1, k_all0, k_all1), (v0, v1, v_all0, v_all1)):
        ref0 = np.asarray(dequantize(quantize(new0, fmt, axis=3)))
        ref1 = np.asarray(dequantize(quantize(new1, fmt, axis=3)))
        all0, all1 = np.asarray(all0), np.asarray(all1)
        assert all1.shape == (2, 10, 2, HEAD_DIM) and all1.dtype == np.float32
        np.testing.assert_array_equal(all0[:, :4], ref0)
        np.testing.assert_array_equal(all1[:, 4:7], ref1)  # the written slots: exactly dequantize(quantize(.))
        np.testing.assert_array_equal(all1[:, :4], ref0)  # earlier slots kept
        np.testing.assert_array_equal(all1[:, 7:], empty_k[:, 7:])  # later slots untouched
        assert not np.array_equal(ref1, np.asarray(new1))  # quantization really happened
    # the stored children of the other slots are bit-identical
    for before, after in ((first.k, second.k), (first.v, second.v)):
        for name_ in ("codes", "scales", "zeros"):
            b, a = np.asarray(getattr(before.packed, name_)), np.asarray(getattr(after.packed, name_))
            np.testing.assert_array_equal(a[:, :4], b[:, :4])
            np.testing.assert_array_equal(a[:, 7:], b[:, 7:])
        np.testing.assert_array_equal(np.asarray(after.packed.codes[:, 4:7]), np.asarray(quantize(
            k1 if before is first.k else v1, fmt, axis=3).codes))


# ---- 3: model-level: cached decoding equals the un-cached KV-quantized forward ---------------------------
@pytest.mark.parametrize("name, qk_rotation", [("int4-asym", False), ("int8-asym", False), ("int4-asym", True)])
def test_cached_decoding_matches_prefill(model, name, qk_rotation):
    tokens = _tokens(2)
    quantized = _with_kv(model, name, qk_rotation=qk_rotation)
    assert all(layer.self_attn.kv_cache == KVCacheConfig.of_format(name) for layer in quantized.layers)
    assert all(layer.self_attn.kv_cache is None for layer in model.layers)  # the copy is separate
    ref = fast_logits(quantized, tokens)
    float_ref = fast_logits(_with_kv(model, None, qk_rotation=qk_rotation), tokens)

    one, cache = fast_cached_logits(quantized, tokens, (SEQ,))
    assert all(layer.k.packed is not None and layer.config == KVCacheConfig.of_format(name) for layer in cache.layers)
    results = [one, fast_cached_logits(quantized, tokens, (1,) * SEQ)[0]]  # token by token from the first one
    if name == "int4-asym" and not qk_rotation:  # (other chunkings compile more shapes; once is enough)
        results.append(fast_cached_logits(quantized, tokens, (4, 4, 4))[0])
        results.append(fast_cached_logits(quantized, tokens, (4,) + (1,) * (SEQ - 4))[0])  # prefill, then decode
    for got in results:
        assert _rel(got, ref) < 1e-5
    # KV quantization changes the function (more so at 4 bits than at 8)
    error = _rel(ref, float_ref)
    assert error > (3e-2 if name == "int4-asym" else 2e-3), error


def test_qk_rotation_alone_is_exact(model):
    """With float keys the online q/k Hadamard leaves the logits unchanged (q kᵀ is invariant)."""
    tokens = _tokens(3)
    assert _rel(fast_logits(_with_kv(model, None, qk_rotation=True), tokens), fast_logits(model, tokens)) < 1e-5


# ---- 4, 5: errors ---------------------------------------------------------------------------------------
def test_cache_format_must_follow_the_layers(model):
    tokens = _tokens(4, batch=1, length=3)
    quantized = _with_kv(model, "int4-asym")
    with pytest.raises(ValueError, match=r"float.*int4-asym.*init_cache"):
        quantized.step(tokens, model.init_cache(1, 8))  # dense cache, quantizing layers
    with pytest.raises(ValueError, match=r"int4-asym.*float.*init_cache"):
        model.step(tokens, quantized.init_cache(1, 8))  # quantized cache, float layers
    with pytest.raises(ValueError, match=r"int8-asym.*int4-asym.*init_cache"):
        quantized.step(tokens, _with_kv(model, "int8-asym").init_cache(1, 8))


def test_group_size_must_divide_head_dim(model):
    kw = dict(num_layers=2, batch=1, capacity=4, kv_heads=2, head_dim=HEAD_DIM, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"layer 0\b.*int4-g64-asym.*head_dim=16"):
        init_cache(**kw, configs="int4-g64-asym")
    with pytest.raises(ValueError, match=r"layer 1\b.*int4-g64-asym.*head_dim=16"):
        init_cache(**kw, configs=("int4-asym", "int4-g64-asym"))
    init_cache(**kw, configs="int4-g8-asym")  # a group that divides 16 is fine
    mixed = _with_kv(model, "int8-asym")
    mixed.layers[1].self_attn.kv_cache = KVCacheConfig.of_format("int4-g64-asym")
    with pytest.raises(ValueError, match=r"layer 1\b.*int4-g64-asym"):
        mixed.init_cache(1, 8)


# ---- 6: generation -------------------------------------------------------------------------------------
def test_generate_with_quantized_kv_matches_full_recompute(model):
    quantized = _with_kv(model, "int4-asym", qk_rotation=True)
    prompt = _tokens(5, batch=2, length=5)
    new = 6
    out = jquant.generate(quantized, prompt, new)
    assert out.shape == (2, 5 + new)
    np.testing.assert_array_equal(out[:, :5], np.asarray(prompt))

    # manual greedy loop of full forwards; a fixed-length buffer keeps one compiled shape: the model is causal
    # and keys/values are quantized per token, so positions past the current one change nothing before it
    seq = np.zeros((2, 5 + new), np.int32)
    seq[:, :5] = np.asarray(prompt)
    for t in range(5, 5 + new):
        logits = np.asarray(fast_logits(quantized, jnp.asarray(seq)))
        seq[:, t] = np.argmax(logits[:, t - 1], axis=-1)
    np.testing.assert_array_equal(out, seq)
