"""Equivalence transforms on mixture-of-experts decoders: QuaRot's residual rotation and SmoothQuant's norm-group
scales act on the router, every expert of a stack ``[E, in, out]``, the shared expert and its gate; exact in float64
for Mixtral, Qwen2-MoE (gated shared expert, a dense layer) and DeepSeek-MoE (ungated shared experts) routing;
per-MLP transforms that have no meaning for an expert block are refused by name; a QuaRot + GPTQ recipe runs on an
MoE model and its checkpoint reloads to the same logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.calib.capture import model_input_statistics
from jquant.models import moe
from jquant.recipes import Recipe, Rule, TransformStep
from jquant.transforms import (apply_transforms, fold_norms, quarot, quarot_params, qsur_report, smoothquant,
                               smoothquant_params)
from jquant.transforms.equivalence import identity_params, merge_weights, module_at, split_weights
from jquant.transforms.layout import SparseMLPLayout, layout_of
from jquant.transforms.ostquant import OSTQuantConfig, train_ostquant

BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_layers=2, num_heads=4,
            num_kv_heads=2, num_experts=4)
FAMILIES = {
    "mixtral": dict(family="mixtral", top_k=2),
    "qwen2_moe": dict(family="qwen2_moe", top_k=2, norm_topk_prob=False, shared_expert_size=16,
                      shared_expert_gate=True, dense_layers=(0,), qkv_bias=True),
    "deepseek_moe": dict(family="deepseek_moe", top_k=2, norm_topk_prob=False, routed_scaling_factor=1.5,
                         shared_expert_size=16, dense_layers=(0,)),
}


def _model(family: str, seed: int, dtype: str = "float64") -> moe.MoE:
    """A random MoE with weights ~ N(0, 1/in) (experts too), RMSNorm gains exp(0.3 N(0, 1)) and an untied head."""
    cfg = moe.MoEConfig(**BASE, **FAMILIES[family], dtype=dtype, param_dtype=dtype)
    model = moe.init_model(cfg, jax.random.key(seed))
    graphdef, weights, rest = split_weights(model)
    rng = np.random.default_rng(seed)
    new = {}
    for path, value in weights.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            a = rng.standard_normal(value.shape) / np.sqrt(value.shape[-2])
        elif leaf == "weight":
            a = np.exp(0.3 * rng.standard_normal(value.shape))
        else:
            a = rng.standard_normal(value.shape) * (1.0 if leaf == "embedding" else 0.1)
        new[path] = jnp.asarray(a, value.dtype)
    return merge_weights(graphdef, new, rest, model)


def _tokens(seed: int, batch: int = 3, length: int = 12) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, BASE["vocab_size"], (batch, length)), jnp.int32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_layout_names_every_reader_and_writer_of_the_expert_block():
    layout = layout_of(_model("qwen2_moe", 0, "float32"))
    dense, sparse = layout.layers
    assert dense.dense_mlp is not None and dense.mlp_writers == ("layers/0/mlp/down_proj",)
    assert isinstance(sparse.mlp, SparseMLPLayout)
    p = "layers/1/mlp"
    assert sparse.mlp_norm.consumers == (f"{p}/gate", f"{p}/experts/gate_proj", f"{p}/experts/up_proj",
                                         f"{p}/shared_expert/gate_proj", f"{p}/shared_expert/up_proj",
                                         f"{p}/shared_expert_gate")
    assert sparse.mlp_writers == (f"{p}/experts/down_proj", f"{p}/shared_expert/down_proj")
    assert layout.has_experts and f"{p}/experts/down_proj" in layout.residual_writers


@pytest.mark.parametrize("family,online", [("mixtral", ()), ("qwen2_moe", ("qk",)), ("deepseek_moe", ())])
def test_quarot_on_moe_is_exact_in_float64(x64, family, online):
    model = _model(family, seed=len(family))
    tokens = _tokens(1)
    rotated = quarot(model, jax.random.key(3), online=online)
    assert _rel(rotated(tokens), model(tokens)) < 1e-10
    # the expert stacks really were rotated, expert by expert: W_e <- R^T diag(gamma) W_e, down W_e <- W_e R
    layer = len(model.layers) - 1
    r = np.asarray(quarot_params(layout_of(model), jax.random.key(3))["residual"], np.float64)
    gain = np.asarray(model.layers[layer].post_attention_layernorm.weight.get_value(), np.float64)
    up = np.asarray(model.layers[layer].mlp.experts.up_proj.kernel.get_value(), np.float64)
    down = np.asarray(model.layers[layer].mlp.experts.down_proj.kernel.get_value(), np.float64)
    for e in range(BASE["num_experts"]):
        np.testing.assert_allclose(rotated.layers[layer].mlp.experts.up_proj.kernel.get_value()[e],
                                   r.T @ (gain[:, None] * up[e]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rotated.layers[layer].mlp.experts.down_proj.kernel.get_value()[e], down[e] @ r,
                                   rtol=1e-10, atol=1e-12)


def test_smoothquant_on_moe_is_exact_and_shares_one_scale_across_experts(x64):
    model = _model("qwen2_moe", seed=5)
    calib = np.asarray(_tokens(2, batch=4, length=16))
    params = smoothquant_params(model, calib, alpha=0.6)
    smoothed = smoothquant(model, calib, alpha=0.6)
    tokens = _tokens(4)
    assert _rel(smoothed(tokens), model(tokens)) < 1e-10
    # the MoE group's weight term is the max over the router, every expert and the shared expert (folded gains)
    folded = fold_norms(model)
    layout = layout_of(folded)
    group = layout.layers[1].mlp_norm
    act = model_input_statistics(folded, calib, {group.consumers[0]}, batch_size=4)[group.consumers[0]].absmax
    w = np.zeros(BASE["hidden_size"])
    for c in group.consumers:
        k = np.abs(np.asarray(module_at(folded, c).kernel.get_value(), np.float64))
        w = np.maximum(w, k.max(axis=-1) if k.ndim == 2 else k.max(axis=(0, 2)))
    np.testing.assert_allclose(params["layers"][1]["mlp_scale"], act**0.6 / w**0.4, rtol=1e-5)


def test_per_mlp_transforms_are_refused_for_expert_blocks():
    model = _model("qwen2_moe", seed=1, dtype="float32")
    with pytest.raises(ValueError, match="mixture of experts.*online=\\('qk',\\)"):
        quarot(model, jax.random.key(0))  # QuaRot's default online rotations include 'down'
    params = identity_params(layout_of(model))
    assert "ud_scale" in params["layers"][0] and "ud_scale" not in params["layers"][1]
    params["layers"][1]["ud_scale"] = jnp.ones(BASE["moe_intermediate_size"])
    with pytest.raises(ValueError, match="'ud_scale'.*mixture of experts"):
        apply_transforms(model, params)
    with pytest.raises(ValueError, match="ostquant: mixture-of-experts"):
        train_ostquant(model, np.asarray(_tokens(0)), jax.random.key(0), OSTQuantConfig(steps=1))
    with pytest.raises(ValueError, match="mixture of experts"):
        jq.quantize(model, Recipe(name="r", rules=(Rule(pattern=".*", weight="int4"),),
                                  transforms=(TransformStep("quarot"),)), None, progress=False)


def test_qsur_report_on_moe_skips_only_the_expert_down_projections():
    model = _model("qwen2_moe", seed=2, dtype="float32")
    rows = qsur_report(model, np.asarray(_tokens(0, batch=8, length=16)), batch_size=8).rows()
    assert "down_proj" in rows[0] and "down_proj" not in rows[1]
    assert all(np.isfinite(v) for row in rows for v in row.values())


def test_quarot_gptq_recipe_on_moe_saves_and_reloads(tmp_path):
    model = _model("mixtral", seed=7, dtype="float32")
    recipe = Recipe(name="quarot-gptq-w4", rules=(Rule(pattern=".*", weight="int4", algorithm="gptq"),),
                    transforms=(TransformStep("quarot", (("online", ()),)),))
    calib = np.asarray(_tokens(3, batch=8, length=16))
    q = jq.quantize(model, recipe, calib, progress=False)
    tokens = _tokens(9)
    plain = jq.quantize(model, Recipe(name="gptq-w4", rules=recipe.rules), calib, progress=False)
    fp = np.asarray(model(tokens))
    assert _rel(q(tokens), fp) < 0.5 and _rel(plain(tokens), fp) < 0.5  # both are working W4 models
    jq.save(q, tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "ckpt")(tokens)), np.asarray(q(tokens)))
