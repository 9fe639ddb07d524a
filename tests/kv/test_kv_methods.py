"""SKVQ and WKVQuant on a tiny Llama with outlier key channels (the specs' small-scale checks), and the baselines."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.formats import QArray
from jquant.recipes import Recipe, Rule
from jquant.kv import KVCacheConfig, KVQuantizer
from jquant.kv.baselines import kivi, rtn
from jquant.kv.calibrate import attention_errors, capture_kv, set_kv_cache
from jquant.kv.skvq import SKVQConfig, channel_groups, skvq
from jquant.kv.wkvquant import WKVQuantConfig, lwc_fake_quantize
from jquant.methods.wkvquant import wkvquant
from jquant.models import llama
from jquant.testing.tiny_models import fast_logits

CFG = llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2)
C = CFG.num_kv_heads * CFG.head_dim  # 32


def _outlier_keys_model(seed=0):
    """Random weights; a few key channels x12 and a constant offset on others, as real keys have."""
    model = llama.init_model(CFG.replace(dtype="float32"), __import__("jax").random.key(seed))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        k = layer.self_attn.k_proj
        w = np.array(k.kernel.get_value()) * 25.0
        w[:, rng.choice(C, 4, replace=False)] *= 12.0
        k.kernel.set_value(jnp.asarray(w))
        v = layer.self_attn.v_proj
        v.kernel.set_value(v.kernel.get_value() * 25.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _outlier_keys_model()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, 97, (4, 48))


def _with(model, config):
    out = nnx.clone(model)
    set_kv_cache(out, lambda _p: config)
    return out


def test_channel_groups_cover_every_channel_once():
    rng = np.random.default_rng(2)
    lo, hi = -np.abs(rng.standard_normal(64)) * rng.uniform(1, 10, 64), np.abs(rng.standard_normal(64)) * 3
    for balanced in (False, True):
        perm, sizes = channel_groups(lo, hi, 8, balanced=balanced, n_init=3)
        assert sorted(perm) == list(range(64)) and sum(sizes) == 64 and len(sizes) <= 8
        x = rng.standard_normal(64)
        np.testing.assert_array_equal(x[np.asarray(perm)][np.argsort(perm)], x)
        if balanced:
            assert sizes == (8,) * 8
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        channel_groups(lo, hi, 24)


def test_skvq_ingredients_each_reduce_attention_error(model, tokens):
    """Spec §5.4: per-token RTN > reorder + clip > reorder + clip + window + sink (attention-output MSE)."""
    g = 8
    errors = {
        "rtn": attention_errors(_with(model, rtn(2, 2, group_size=g)), tokens),
        "reorder": attention_errors(skvq(model, tokens, SKVQConfig(group_size=g, window=0, sink=0, clip=1.0,
                                                                   pre_rope=False, meta_dtype="float16"))[0], tokens),
        "full": attention_errors(skvq(model, tokens, SKVQConfig(group_size=g, window=8, sink=2, clip=1.0))[0], tokens),
    }
    total = {k: sum(v.values()) for k, v in errors.items()}
    assert total["rtn"] > total["reorder"] > total["full"] > 0, total


def test_skvq_clip_search_picks_each_layers_best_clip(model, tokens):
    grid = (0.85, 0.95, 1.0)
    cfg = SKVQConfig(group_size=8, window=0, sink=0, clip="search", clip_grid=grid, n_init=2)
    searched, report = skvq(model, tokens, cfg)
    assert set(report.search_errors) == set(grid)
    for path, chosen in report.clip.items():
        assert report.search_errors[chosen][path] == min(report.search_errors[c][path] for c in grid)
    # the first layer sees the same inputs in every model: its error is never worse than without clipping
    plain, _ = skvq(model, tokens, SKVQConfig(group_size=8, window=0, sink=0, clip=1.0, n_init=2))
    first = "layers/0/self_attn"
    assert attention_errors(searched, tokens)[first] <= attention_errors(plain, tokens)[first] * (1 + 1e-6)
    assert sum(report.key_groups[first]) == C


def test_ternary_values_run_end_to_end(model, tokens):
    q, _ = skvq(model, tokens, SKVQConfig(key_bits=2, value_bits=1.5, group_size=8, window=4, sink=2, n_init=2))
    logits = np.asarray(fast_logits(q, jnp.asarray(tokens[:, :24])))
    assert np.all(np.isfinite(logits))
    assert q.layers[0].self_attn.kv_cache.value.bits == 1.5


def test_past_only_helps(model, tokens):
    """WKVQuant §5.2: at low bits, the current token reading its own exact key/value lowers the error."""
    base = KVCacheConfig(key=KVQuantizer(bits=2, group_size=16), value=KVQuantizer(bits=2, group_size=16))
    poq = KVCacheConfig(key=base.key, value=base.value, past_only=True)
    e_base, e_poq = attention_errors(_with(model, base), tokens), attention_errors(_with(model, poq), tokens)
    assert sum(e_poq.values()) < sum(e_base.values())


def test_kivi_and_rtn_configs():
    c = kivi(2, 1.5, group_size=16)
    assert c.key.axis == "channel" and c.key.block == 16 and c.value.bits == 1.5
    assert rtn(4, 4, group_size=16).key.axis == "token"


def test_lwc_matches_plain_rtn_at_init_limit():
    """With clipping strengths -> 1 (large gamma, beta) LWC is asymmetric min-max RTN per group."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    big = jnp.full((2, 8), 30.0)
    got = np.asarray(lwc_fake_quantize(w, big, big, 4, 32))
    wg = np.asarray(w, np.float64).reshape(2, 32, 8)
    lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
    h = (hi - lo) / 15
    z = -np.round(lo / h)
    want = ((np.clip(np.round(wg / h) + z, 0, 15) - z) * h).reshape(64, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def w4kv4(model, tokens):
    """One WKVQuant run (learning takes most of a minute on 2 cores), shared by the tests that read its result."""
    return wkvquant(model, tokens, WKVQuantConfig(weight_group=32, epochs=3), progress=False)


def test_wkvquant_learns_and_stores_int4_weights(model, tokens, w4kv4):
    q, report = w4kv4
    assert len(report.loss_before) == CFG.num_layers
    assert sum(report.loss_after) < sum(report.loss_before)  # CRR training lowers its own loss
    kernel = q.layers[0].mlp.up_proj.kernel.get_value()
    assert isinstance(kernel, QArray) and kernel.format.bits == 4 and kernel.format.group_size == 32
    attn = q.layers[1].self_attn
    assert attn.kv_cache.past_only and attn.kv_smoothing is not None
    samples = capture_kv(model, tokens)["layers/1/self_attn"]
    lo, hi = samples.channel_range(samples.k)
    assert not np.allclose(np.asarray(attn.kv_smoothing.k_shift.get_value()), (hi + lo) / 2)  # learned, not init
    fp = np.asarray(fast_logits(model, jnp.asarray(tokens)))
    ours = np.asarray(fast_logits(q, jnp.asarray(tokens)))
    # The method's claim at equal bits: int4 asymmetric g32 weights + 4-bit per-token KV groups of head_dim with the
    # current tokens unquantized, as WKVQuant stores them, but round-to-nearest without smoothing or learned clipping.
    recipe = Recipe(name="rtn-w4g32", rules=[Rule(pattern=r"layers/.*", weight="int4-g32-asym", algorithm="rtn")],
                       keep_float=("embed_tokens", "lm_head"))
    baseline = _with(jq.quantize(model, recipe, progress=False),
                     dataclasses.replace(rtn(4, 4, group_size=CFG.head_dim), past_only=True))
    rtn_logits = np.asarray(fast_logits(baseline, jnp.asarray(tokens)))
    error = {name: np.linalg.norm(x - fp) / np.linalg.norm(fp) for name, x in (("wkvquant", ours), ("rtn", rtn_logits))}
    assert np.all(np.isfinite(ours)) and error["wkvquant"] < error["rtn"], error


def test_wkvquant_bad_group_is_named(model, tokens):
    with pytest.raises(ValueError, match="weight_group=48 does not divide"):
        wkvquant(model, tokens, WKVQuantConfig(weight_group=48), progress=False)


def test_wkvquant_model_saves_and_loads(tokens, w4kv4, tmp_path):
    q, _ = w4kv4
    assert q.quantization.site("layers/0/mlp/up_proj").startswith("int4-g32-asym")
    jq.save(q, tmp_path / "w4kv4")
    loaded = jq.load(tmp_path / "w4kv4")
    assert loaded.layers[1].self_attn.kv_cache == q.layers[1].self_attn.kv_cache
    np.testing.assert_array_equal(np.asarray(fast_logits(loaded, jnp.asarray(tokens))),
                                  np.asarray(fast_logits(q, jnp.asarray(tokens))))
