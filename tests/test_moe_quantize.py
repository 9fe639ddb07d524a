"""The quantization core on stacked expert weights: per-expert statistics from routed tokens only, affinity-weighted
Hessians (MoEQuant's AGQ), per-expert GPTQ, experts with no calibration token, mixed per-expert recipes (MxMoE),
and checkpoints of all of these."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.algorithms.experts import quantize_experts
from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import capture_statistics
from jquant.formats import ExpertPartition, QArray, dequantize, get_format
from jquant.models import moe
from jquant.models.layers import ExpertLinear
from jquant.recipes import Recipe, Rule

CFG = moe.MoEConfig(family="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=32,
                    num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=1, norm_topk_prob=False,
                    shared_expert_size=16, shared_expert_gate=True, dense_layers=(0,), qkv_bias=True)


def _model(starve_expert: bool = False):
    model = moe.init_model(CFG, jax.random.key(0))
    if starve_expert:  # expert 3's logit always loses to expert 0 or expert 2 (top-1): it never sees a token
        gate = model.layers[1].mlp.gate.kernel
        w = gate.get_value()
        gate.set_value(w.at[:, 3].set(0.5 * w[:, 0]).at[:, 2].set(-w[:, 0]))
    return model


def _calib(seed=0, n=4, t=16):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def test_expert_statistics_use_only_routed_rows_and_affinities():
    layer = ExpertLinear(3, 8, 5, sharding=("embed", "mlp"), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    layer.capture_inputs = True
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 8)).astype(np.float32)
    sizes = np.array([4, 0, 5], np.int32)
    c = rng.uniform(0.1, 1.0, size=9).astype(np.float32)
    _, stats = capture_statistics(lambda m, x, s, c: m(x, s, c))(layer, jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(c))
    st = stats[""]
    assert st.num_groups == 3 and list(st.count) == [4, 0, 5]
    rows = {0: slice(0, 4), 2: slice(4, 9)}
    for e, r in rows.items():
        xe = x[r].astype(np.float64)
        np.testing.assert_allclose(st.group(e).hessian, xe.T @ xe, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.group(e).affinity_hessian, xe.T @ (c[r, None] * xe), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.group(e).affinity, c[r].sum(), rtol=1e-6)
        np.testing.assert_allclose(st.group(e).absmax, np.abs(xe).max(0), rtol=1e-6)
    assert st.group(1).count == 0 and np.all(st.group(1).hessian == 0)
    h = st.affinity_hessian[2]
    assert np.allclose(h, h.T) and np.linalg.eigvalsh(h).min() > -1e-5  # symmetric PSD


def test_affinity_one_gives_bit_identical_gptq():
    """MoEQuant spec §5 invariant 1: with c ≡ 1 AGQ's Hessian is plain GPTQ's and the weights are bit-identical."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 16))
    w = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    hess = np.stack([x[:20].T @ x[:20], x[20:].T @ x[20:]])
    from jquant.calib.capture import InputStatistics

    stats = InputStatistics(hessian=hess, count=np.array([20.0, 20.0]), absmax=np.ones((2, 16)), affinity_hessian=hess.copy(),
                            affinity=np.array([20.0, 20.0]))
    fmt = get_format("int4")
    plain = quantize_experts(w, fmt, algorithm="gptq", experts=(0, 1), stats=stats, options={"hessian": "plain"})
    agq = quantize_experts(w, fmt, algorithm="gptq", experts=(0, 1), stats=stats, options={"hessian": "affinity"})
    np.testing.assert_array_equal(np.asarray(plain.weight.codes), np.asarray(agq.weight.codes))
    np.testing.assert_array_equal(np.asarray(plain.weight.scales), np.asarray(agq.weight.scales))
    # and each expert equals GPTQ run on its own [in, out] slice with its own Hessian
    for e in range(2):
        alone = gptq_weight(w[e], fmt, axis=0, stats=stats.group(e))
        np.testing.assert_array_equal(np.asarray(dequantize(alone)), np.asarray(dequantize(plain.weight))[e])
    weighted = dataclasses.replace(stats, affinity_hessian=np.stack([x[:20].T @ (np.linspace(0.1, 1, 20)[:, None] * x[:20])] * 2))
    differs = quantize_experts(w, fmt, algorithm="gptq", experts=(0, 1), stats=weighted, options={"hessian": "affinity"})
    # AGQ runs GPTQ on each expert's affinity-weighted Hessian Σ c_i x_i x_iᵀ (spec moequant.md §3.3), not the plain one
    for e in range(2):
        alone = gptq_weight(w[e], fmt, axis=0, stats=dataclasses.replace(
            stats.group(e), hessian=weighted.affinity_hessian[e], affinity_hessian=None, affinity=None))
        np.testing.assert_array_equal(np.asarray(dequantize(alone)), np.asarray(dequantize(differs.weight))[e])
    assert not np.array_equal(np.asarray(differs.weight.codes), np.asarray(plain.weight.codes))


def test_gptq_on_moe_reports_starved_expert_and_round_trips(tmp_path):
    model = _model(starve_expert=True)
    recipe = Recipe(name="w4-experts", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq",
                                                   options={"hessian": "affinity"}),))
    with pytest.raises(ValueError, match="only expert stacks and gated shared experts record"):
        jq.quantize(model, recipe, _calib(), progress=False)
    recipe = Recipe(name="w4-experts", rules=(
        Rule(pattern=".*/(experts|shared_expert)/.*", weight="int4", algorithm="gptq", options={"hessian": "affinity"}),
        Rule(pattern=".*", weight="int4", algorithm="gptq")))
    q = jq.quantize(model, recipe, _calib(), progress=False)
    report = q.quantization.site("layers/1/mlp/experts/down_proj")
    assert "experts 3 saw no calibration token" in report, report
    stored = q.layers[1].mlp.experts.down_proj.kernel.get_value()
    assert isinstance(stored, QArray) and stored.shape == (4, 32, 32) and stored.axis == 1
    # the starved expert is round-to-nearest of its own weights, with its own scales
    rtn = dequantize(jq.formats.quantize(model.layers[1].mlp.experts.down_proj.kernel.get_value()[3], get_format("int4"), axis=0))
    np.testing.assert_array_equal(np.asarray(dequantize(stored))[3], np.asarray(rtn))
    tokens = jnp.asarray(_calib(5))
    jq.save(q, tmp_path / "q")
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "q")(tokens)), np.asarray(q(tokens)))


def test_gated_shared_expert_records_its_gate_as_affinity():
    """Qwen-MoE's shared expert: c = sigmoid(shared_expert_gate(x)) weights its Hessian (MoEQuant spec §3.3)."""
    from jquant.calib.capture import model_input_statistics

    model = _model()
    tokens = _calib(7)
    stats = model_input_statistics(model, tokens, {"layers/1/mlp/shared_expert/up_proj"})["layers/1/mlp/shared_expert/up_proj"]
    hidden, positions = model.block_inputs(jnp.asarray(tokens))
    hidden = model.layers[0].calibration_forward(hidden, positions)
    layer = model.layers[1]
    h = hidden + layer.self_attn(layer.input_layernorm(hidden), positions, None, None)[0]
    x = np.asarray(layer.post_attention_layernorm(h), np.float64).reshape(-1, CFG.hidden_size)
    c = 1 / (1 + np.exp(-(x @ np.asarray(layer.mlp.shared_expert_gate.kernel.get_value(), np.float64))))
    np.testing.assert_allclose(stats.affinity_hessian, x.T @ (c * x), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(stats.hessian, x.T @ x, rtol=2e-4, atol=2e-4)


def test_mixed_expert_recipe_builds_a_partition_that_saves(tmp_path):
    model = _model()
    recipe = Recipe(name="mixed", rules=(
        Rule(pattern=r".*/experts/(gate|up)_proj/[02]", weight="int4-g16-asym"),
        Rule(pattern=r".*/experts/down_proj/1", weight="int8", activation="int8"),
        Rule(pattern=r".*/experts/.*_proj/3", weight=None),
        Rule(pattern=r".*/experts/.*", weight="int2-g16-asym"),
    ))
    q = jq.quantize(model, recipe, progress=False)
    gate = q.layers[1].mlp.experts.gate_proj.kernel.get_value()
    down = q.layers[1].mlp.experts.down_proj.kernel.get_value()
    assert isinstance(gate, ExpertPartition) and gate.experts == ((0, 2), (1,), (3,))
    original = model.layers[1].mlp.experts.gate_proj.kernel.get_value()
    full = np.asarray(gate.dequantize(jnp.float32))
    for e, name in ((0, "int4-g16-asym"), (2, "int4-g16-asym"), (1, "int2-g16-asym")):
        expect = dequantize(jq.formats.quantize(original[e], get_format(name), axis=0))
        np.testing.assert_array_equal(full[e], np.asarray(expect))
    np.testing.assert_array_equal(full[3], np.asarray(original[3]))  # float expert
    assert q.layers[1].mlp.experts.down_proj.activation == (None, get_format("int8"), None, None)
    assert "experts 1: int8 (rtn), activations int8" in q.quantization.site("layers/1/mlp/experts/down_proj")
    assert isinstance(down, ExpertPartition)
    tokens = jnp.asarray(_calib(6))
    jq.save(q, tmp_path / "mixed")
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "mixed")(tokens)), np.asarray(q(tokens)))


@pytest.mark.parametrize("rule, message", [
    (Rule(pattern=r".*/experts/.*", weight="int8-tensor"), "one scale for the whole tensor"),
    (Rule(pattern=r".*/experts/.*", weight="nvfp4"), "one scale for the whole tensor"),
    (Rule(pattern=r".*/experts/.*", weight="int4", algorithm="gptq", options={"hessian": "squared"}), "must be 'plain' or 'affinity'"),
    (Rule(pattern=r".*/experts/.*", weight="vq-d2-k4-cb256x16", algorithm="gptvq"), "'rtn' or 'gptq'"),
    (Rule(pattern=r".*/experts/down_proj/9", weight="int4"), "matched no quantization site"),
])
def test_bad_expert_rules_are_refused_before_work(rule, message):
    model = _model()
    before = np.asarray(model.layers[1].mlp.experts.up_proj.kernel.get_value())
    with pytest.raises(ValueError, match=message):
        jq.quantize(model, Recipe(name="bad", rules=(rule,)), _calib(), progress=False)
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.experts.up_proj.kernel.get_value()), before)
