"""Bounded capture memory: sub-batched capture passes give the statistics of whole-batch ones.

``walk_blocks`` captures a calibration batch in sub-batches when its per-sequence statistics exceed
``capture_budget``; the host continues its float64 sums sequence by sequence, which is exact (checked on
the captured arrays themselves). The block forward inside a capture call is XLA's, whose float32 results
for a sequence may depend on the batch shape (on XLA:CPU they do for some shapes), so through
``walk_blocks`` the statistics are compared to float32 rounding, and they are equal bit for bit where
the forward is (one sequence at a time vs a batch of 4 on the tiny Llama). Checked on a token LM, on two
grouped families (modalities over two stages, timestep buckets), on an MoE decoder (stacked expert sites
need the whole batch in one call and are bit-identical; a gated shared expert records affinity
statistics), and on a context leaf shared by the batch. The stage entry compiles once across calls.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jquant.models import llama, moe

from jquant.calib import sequential, walk_blocks
from jquant.formats import QArray
from jquant.quantization import quantize
from jquant.recipes import get
from jquant.testing.tiny_families import (
    TinyDiT,
    TinyDiTConfig,
    TinyMLLM,
    TinyMLLMConfig,
)

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


class CallSizes:
    """A stand-in for ``sequential._block_statistics`` that records the batch size of every capture call."""

    def __init__(self, capture):
        self.capture, self.sizes = capture, []

    def __call__(self, block, hidden, context, **kwargs):
        self.sizes.append(jax.tree.leaves(hidden)[0].shape[0])
        return self.capture(block, hidden, context, **kwargs)

    def layout(self, *args):
        return self.capture.layout(*args)


def _stats(model, calib, budget=None, batch_size=8):
    seen = {}
    walk_blocks(model, calib, lambda v: seen.update({f"{v.path}/{k}": s for k, s in v.stats.items()}),
                batch_size=batch_size, capture_budget=budget, progress=False)
    return seen


def _assert_equal(got: dict, want: dict, exact=lambda path: False):
    """Every statistic of every site equal: bit for bit where ``exact(path)``, else to float32 rounding."""
    assert list(got) == list(want)
    for path, w in want.items():
        for field in dataclasses.fields(w):
            a, b = getattr(got[path], field.name), getattr(w, field.name)
            assert (a is None) == (b is None), (path, field.name)
            if b is None:
                continue
            if exact(path) or field.name == "count":  # token counts: no rounding
                np.testing.assert_array_equal(a, b, err_msg=f"{path} {field.name}")
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=f"{path} {field.name}")


def _sub_batched_equals_whole(model, calib, monkeypatch, budget=1, batch_size=8, exact=lambda path: False):
    """Statistics with ``budget`` equal the default's; returns the capture calls' batch sizes with ``budget``."""
    want = _stats(model, calib, batch_size=batch_size)
    spy = CallSizes(sequential._block_statistics)
    monkeypatch.setattr(sequential, "_block_statistics", spy)
    _assert_equal(_stats(model, calib, budget, batch_size=batch_size), want, exact)
    return spy.sizes


def test_running_sums_continue_exactly():
    """Statistics of a captured batch's arrays cut in three parts, continued, equal those of the whole arrays."""
    from jquant.calib.capture import statistics_from_state

    model = llama.init_model(CFG, jax.random.key(6))
    block, state = model.layers[0], model.block_inputs(jnp.asarray(np.random.default_rng(8).integers(0, 64, (7, 9))))
    sequential.set_capture(block, True)
    _, captured = sequential._block_statistics._captured(block, *state)
    sequential.set_capture(block, False)
    rows = lambda start, stop: jax.tree.map(lambda a: a[start:stop], captured)  # noqa: E731
    running = None
    for start, stop in ((0, 3), (3, 6), (6, 7)):
        running = statistics_from_state(rows(start, stop), running)
    _assert_equal(running, statistics_from_state(captured), exact=lambda path: True)


def test_layout_counts_every_per_sequence_statistic():
    model = llama.init_model(CFG, jax.random.key(0))
    block, (hidden, positions) = model.layers[0], model.block_inputs(jnp.zeros((3, 5), jnp.int32))
    sequential.set_capture(block, True)
    layout = sequential._block_statistics.layout(block, hidden, positions)
    sequential.set_capture(block, False)
    d, f = CFG.hidden_size, CFG.intermediate_size
    # per site and sequence: Gram in², absmax and sum in, token count 1 (float32)
    want = {f"self_attn/{p}_proj": 4 * (d * d + 2 * d + 1) for p in "qkvo"}
    want |= {"mlp/gate_proj": 4 * (d * d + 2 * d + 1), "mlp/up_proj": 4 * (d * d + 2 * d + 1),
             "mlp/down_proj": 4 * (f * f + 2 * f + 1)}
    assert layout.bytes_per_sequence == want and layout.per_call == ()
    total = sum(want.values())
    assert layout.sequences_within(2 * total + 1) == 2 and layout.sequences_within(1) == 1


def test_token_lm_one_sequence_at_a_time(monkeypatch):
    model = llama.init_model(CFG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 64, size=(7, 9))
    sizes = _sub_batched_equals_whole(model, tokens, monkeypatch, batch_size=4, exact=lambda path: True)
    assert sizes == [1] * 7 * CFG.num_layers


def test_token_lm_sub_batches_within_the_budget(monkeypatch):
    model = llama.init_model(CFG, jax.random.key(1))
    tokens = np.random.default_rng(1).integers(0, 64, size=(8, 9))
    block, state = model.layers[0], model.block_inputs(jnp.asarray(tokens))
    sequential.set_capture(block, True)
    per_sequence = sum(sequential._block_statistics.layout(block, *state).bytes_per_sequence.values())
    sequential.set_capture(block, False)
    sizes = _sub_batched_equals_whole(model, tokens, monkeypatch, budget=3 * per_sequence)
    assert sizes == [3, 3, 2] * CFG.num_layers  # three calls of at most 3 sequences per batch of 8


def test_modality_groups_over_two_stages(monkeypatch):
    mllm = TinyMLLM(TinyMLLMConfig(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    calib = {"tokens": rng.integers(0, 32, (5, 6)).astype(np.int32),
             "patches": rng.normal(size=(5, 4, 12)).astype(np.float32)}
    stats = _stats(mllm, calib)
    assert any(s.num_groups == 2 for s in stats.values())  # grouped statistics are part of the check
    sizes = _sub_batched_equals_whole(mllm, calib, monkeypatch, batch_size=3)
    assert set(sizes) == {1}


def test_timestep_buckets(monkeypatch):
    dit = TinyDiT(TinyDiTConfig(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(3)
    calib = {"latents": rng.normal(size=(6, 6, 8)).astype(np.float32),
             "timesteps": np.array([0.1, 0.9, 0.5, 0.2, 0.7, 0.95], np.float32),
             "text": rng.normal(size=(6, 3, 16)).astype(np.float32)}
    assert set(_sub_batched_equals_whole(dit, calib, monkeypatch)) == {1}


def test_moe_experts_are_captured_on_the_whole_batch(monkeypatch):
    cfg = moe.MoEConfig(family="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                        moe_intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                        shared_expert_size=32, shared_expert_gate=True, max_position_embeddings=64)
    model = moe.init_model(cfg, jax.random.key(2))
    tokens = np.random.default_rng(4).integers(0, 64, size=(4, 10))
    stats = _stats(model, tokens)
    assert stats["layers/0/mlp/experts/gate_proj"].num_groups == 4
    assert stats["layers/0/mlp/shared_expert/up_proj"].affinity_hessian is not None
    sizes = _sub_batched_equals_whole(model, tokens, monkeypatch, exact=lambda path: "/experts/" in path)
    assert sizes == [1, 1, 1, 1, 4]  # per-sequence sites one at a time, then the expert sites on the batch


class SharedPositionsLlama(llama.Llama):
    """A Llama whose block context, the positions ``[1, T]``, is shared by the batch (broadcast, not per sequence)."""

    def block_inputs(self, tokens):
        hidden, _ = super().block_inputs(tokens)
        return hidden, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]


def test_context_shared_by_the_batch_is_not_sliced(monkeypatch):
    model = SharedPositionsLlama(CFG, rngs=nnx.Rngs(params=jax.random.key(3)))
    tokens = np.random.default_rng(5).integers(0, 64, size=(4, 9))
    _assert_equal(_stats(model, tokens), _stats(llama.Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(3))), tokens))
    assert set(_sub_batched_equals_whole(model, tokens, monkeypatch)) == {1}


def test_gptq_weights_are_identical(monkeypatch):
    # one sequence at a time (quantize's capture_budget of 1 byte) vs batches of 4: the shapes whose statistics
    # are bit-identical above
    model = llama.init_model(CFG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 64, size=(7, 9))
    recipe = get("gptq-w4g128", weight="int4-g16-asym")
    want = quantize(model, recipe, tokens, batch_size=4, progress=False)
    spy = CallSizes(sequential._block_statistics)
    monkeypatch.setattr(sequential, "_block_statistics", spy)
    got = quantize(model, recipe, tokens, batch_size=4, progress=False, capture_budget=1)
    assert set(spy.sizes) == {1}
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param), is_leaf=lambda x: isinstance(x, QArray))  # noqa: E731
    quantized = 0
    for a, b in zip(leaves(got), leaves(want), strict=True):
        quantized += isinstance(b, QArray)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert quantized == 7 * CFG.num_layers


@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_bad_budget_is_refused(budget):
    model = llama.init_model(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="capture_budget must be a positive number of bytes"):
        walk_blocks(model, np.zeros((2, 4), np.int32), lambda v: None, capture_budget=budget, progress=False)
    with pytest.raises(ValueError, match="quantize: capture_budget must be a positive number of bytes"):
        quantize(model, "gptq-w4g128", np.zeros((2, 4), np.int32), capture_budget=budget, progress=False)


def test_stage_entry_compiles_once_across_quantize_calls(caplog):
    # a config no other test uses, so the entry's first compile happens here
    cfg = CFG.replace(hidden_size=24, num_heads=3, num_kv_heads=1, intermediate_size=40)
    model = llama.init_model(cfg, jax.random.key(5))
    tokens = np.random.default_rng(7).integers(0, 64, size=(4, 8))
    recipe = get("gptq-w4g128", weight="int4-g8-asym")
    compiles = []
    jax.config.update("jax_log_compiles", True)
    try:
        for _ in range(2):
            caplog.clear()
            with caplog.at_level("WARNING"):
                quantize(model, recipe, tokens, batch_size=4, progress=False)
            compiles.append([r.getMessage() for r in caplog.records if "Compiling jit(_enter)" in r.getMessage()])
    finally:
        jax.config.update("jax_log_compiles", False)
    assert len(compiles[0]) == 1 and compiles[1] == [], compiles


def test_captured_statistics_are_freed_without_the_garbage_collector():
    """A capture call's device arrays (the per-sequence Grams) are freed by reference counting once its
    statistics are summed: nothing it returns sits in a reference cycle that only ``gc.collect`` would free
    (such cycles kept several GB of Grams resident on a 4096-wide block)."""
    import gc

    model = llama.init_model(CFG, jax.random.key(6))
    block, state = model.layers[0], model.block_inputs(jnp.asarray(np.random.default_rng(9).integers(0, 64, (3, 9))))
    sequential.set_capture(block, True)
    sequential._block_statistics(block, *state)  # compiled here: tracing leaves cyclic garbage of its own
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        sequential._block_statistics(block, *state)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, jax.Array) and not isinstance(o, jax.core.Tracer)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        sequential.set_capture(block, False)
    assert not cyclic, f"{len(cyclic)} arrays of shapes {sorted({a.shape for a in cyclic})} were only freed by gc"


def test_sites_reading_one_input_share_their_statistics():
    """q/k/v (and gate/up) capture one input: one ``InputStatistics`` serves them, equal to each site's own sum
    in float64, while o_proj and down_proj keep their own."""
    model = llama.init_model(CFG, jax.random.key(10))
    stats = _stats(model, np.random.default_rng(11).integers(0, 64, (6, 9)).astype(np.int32), budget=1, batch_size=4)
    attn, mlp = "layers/0/self_attn", "layers/0/mlp"
    assert stats[f"{attn}/q_proj"] is stats[f"{attn}/k_proj"] is stats[f"{attn}/v_proj"]
    assert stats[f"{mlp}/gate_proj"] is stats[f"{mlp}/up_proj"]
    assert stats[f"{attn}/o_proj"] is not stats[f"{attn}/q_proj"]
    assert stats[f"{mlp}/down_proj"] is not stats[f"{mlp}/gate_proj"]


def test_sites_that_stop_being_equal_get_their_own_running_sums():
    """Two sites equal on the first sequences share statistics; when a later sub-batch differs, each continues
    its own float64 sums (the shared running arrays are continued in place, so the second must be copied)."""
    from jquant.calib.capture import statistics_from_state

    rng = np.random.default_rng(12)

    def captured(x_a, x_b):  # plain per-sequence statistics of two sites: [B, n, in] inputs
        site = lambda x: {"input_hessian": np.einsum("bni,bnj->bij", x, x), "input_count": np.full(len(x), 5.0),  # noqa: E731
                          "input_absmax": np.abs(x).max(axis=1), "input_total": x.sum(axis=1)}
        return {"a": site(x_a), "b": site(x_b)}

    first = rng.standard_normal((2, 5, 4)).astype(np.float32)
    later_a, later_b = (rng.standard_normal((3, 5, 4)).astype(np.float32) for _ in range(2))
    running = statistics_from_state(captured(first, first))
    assert running["a"] is running["b"]
    running = statistics_from_state(captured(later_a, later_b), running)
    assert running["a"] is not running["b"]
    for name, later in (("a", later_a), ("b", later_b)):
        x = np.concatenate([first, later]).astype(np.float64).reshape(-1, 4)
        np.testing.assert_allclose(running[name].hessian, x.T @ x, rtol=1e-6, atol=1e-6 * np.abs(x.T @ x).max())
        np.testing.assert_allclose(running[name].total, x.sum(axis=0), rtol=1e-6, atol=1e-6)
        assert running[name].count == 25.0
