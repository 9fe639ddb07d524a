"""Input capture and block-by-block calibration on a small Llama."""

import jax
import numpy as np
import pytest

from jquant.calib.capture import capture_statistics, set_capture
from jquant.calib.sequential import walk_blocks
from jquant.models import llama

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.fixture()
def model():
    return llama.init_model(CFG, jax.random.key(0))


def test_captured_hessian_is_xtx_summed_over_calls(model):
    layer = model.layers[0]
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, 5, 32)).astype(np.float32) for _ in range(3)]
    pos = np.broadcast_to(np.arange(5), (2, 5))
    set_capture(layer, True)
    forward = capture_statistics(lambda m, x: m(x, pos, None, None)[0])
    results = [forward(layer, x)[1] for x in xs]
    set_capture(layer, False)
    stats = {p: s.merge(results[1][p]).merge(results[2][p]) for p, s in results[0].items()}
    normed = np.concatenate([np.asarray(layer.input_layernorm(x)).reshape(-1, 32) for x in xs]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(stats["self_attn/q_proj"].hessian), normed.T @ normed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["self_attn/k_proj"].absmax), np.abs(normed).max(0), rtol=1e-6)
    assert stats["mlp/down_proj"].hessian.shape == (48, 48) and stats["mlp/down_proj"].count == 30
    # capture off: nothing is recorded
    assert forward(layer, xs[0])[1] == {}


def test_each_block_sees_the_outputs_of_processed_blocks(model):
    tokens = np.random.default_rng(1).integers(0, 64, size=(5, 8))
    seen = {}

    def zero_block(visit):
        seen[visit.path], block = visit.stats, visit.block
        # make the block an identity map: no attention or MLP contribution to the residual stream
        block.self_attn.o_proj.kernel[...] = 0 * block.self_attn.o_proj.kernel[...]
        block.mlp.down_proj.kernel[...] = 0 * block.mlp.down_proj.kernel[...]

    walk_blocks(model, tokens, zero_block, batch_size=2, progress=False)
    assert list(seen) == ["layers/0", "layers/1", "layers/2"]
    # all norms are 1 at init, so identity blocks feed every later block exactly the embedding
    for later in ("layers/1", "layers/2"):
        np.testing.assert_allclose(np.asarray(seen[later]["self_attn/q_proj"].hessian),
                                   np.asarray(seen["layers/0"]["self_attn/q_proj"].hessian), rtol=1e-6)


def test_untouched_blocks_see_different_inputs(model):
    tokens = np.random.default_rng(1).integers(0, 64, size=(4, 8))
    seen = {}
    walk_blocks(model, tokens, lambda v: seen.setdefault(v.path, v.stats), batch_size=4, progress=False)
    assert not np.allclose(np.asarray(seen["layers/1"]["self_attn/q_proj"].hessian),
                           np.asarray(seen["layers/0"]["self_attn/q_proj"].hessian))


def test_block_forward_compiles_once_per_block_structure(monkeypatch):
    # a shape no other test uses, so the module-level jit caches start cold for it
    model = llama.init_model(CFG.replace(intermediate_size=40), jax.random.key(0))
    traces = []
    original = llama.DecoderLayer.calibration_forward

    def counting(self, x, positions):
        traces.append(getattr(self.mlp.up_proj, "capture_inputs", None))
        return original(self, x, positions)

    monkeypatch.setattr(llama.DecoderLayer, "calibration_forward", counting)
    tokens = np.random.default_rng(2).integers(0, 64, size=(6, 8))
    walk_blocks(model, tokens, lambda v: None, batch_size=2, progress=False)
    # 3 layers x 3 chunks x 2 passes = 18 calls, but only two traces: capturing and not capturing
    assert traces == [True, False], traces


def test_without_final_states_the_last_forward_is_skipped_and_the_statistics_are_the_same(monkeypatch):
    from jquant.calib import sequential

    model = llama.init_model(CFG, jax.random.key(0))
    tokens = np.random.default_rng(3).integers(0, 64, size=(4, 8))
    calls = []
    original = sequential.block_forward

    def counting(block, hidden, context):
        calls.append(id(block))
        return original(block, hidden, context)

    monkeypatch.setattr(sequential, "block_forward", counting)
    runs = {}
    for final in (True, False):
        seen, calls[:] = {}, []
        out = walk_blocks(model, tokens, lambda v, seen=seen: seen.setdefault(v.path, v.stats), batch_size=2,
                          progress=False, final_states=final)
        runs[final] = seen, list(calls), out
    (full, full_calls, states), (short, short_calls, nothing) = runs[True], runs[False]
    assert nothing == [] and len(states) == 2
    last = id(model.layers[-1])
    assert full_calls.count(last) == 2 and short_calls.count(last) == 0  # the last block, once per batch of 2
    assert [c for c in full_calls if c != last] == short_calls
    for path in full:
        for site, st in full[path].items():
            np.testing.assert_array_equal(np.asarray(short[path][site].hessian), np.asarray(st.hessian))


def test_empty_calibration_set_is_rejected(model):
    with pytest.raises(ValueError, match="no sample"):
        walk_blocks(model, np.zeros((0, 8), np.int32), lambda v: None, progress=False)


def test_quantization_snr_is_measured_with_the_sites_own_quantizer(model):
    from jquant.formats import fake_quantize, get_format

    layer = model.layers[0]
    fmt = get_format("int4-tensor-asym")
    layer.mlp.down_proj.activation = fmt
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(2, 5, 32)).astype(np.float32) for _ in range(2)]
    pos = np.broadcast_to(np.arange(5), (2, 5))
    set_capture(layer, True)
    forward = capture_statistics(lambda m, x: m(x, pos, None, None)[0])
    results = [forward(layer, x)[1] for x in xs]
    set_capture(layer, False)
    stats = results[0]["mlp/down_proj"].merge(results[1]["mlp/down_proj"])
    assert results[0]["mlp/up_proj"].energy is None  # float inputs: no error recorded
    energy = error = 0.0
    for x in xs:  # the down_proj input, recomputed from the layer's float parts
        h = np.asarray(x + layer.self_attn(layer.input_layernorm(x), pos, None, None)[0])
        normed = np.asarray(layer.post_attention_layernorm(h))
        act = np.asarray(jax.nn.silu(normed @ np.asarray(layer.mlp.gate_proj.kernel[...]))
                         * (normed @ np.asarray(layer.mlp.up_proj.kernel[...])), np.float64)
        energy += np.sum(act**2)
        for seq in act.astype(np.float32):  # dynamic per-tensor activations: one scale per sequence
            error += np.sum((seq - np.asarray(fake_quantize(seq, fmt, axis=-1), np.float64)) ** 2)
    np.testing.assert_allclose(stats.quantization_snr_db, 10 * np.log10(energy / error), rtol=1e-3)
