"""Sampling under a plan and the plan search on a tiny random SD3 transformer (spec §5 checks 1, 2, 4, 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.ditfastattn import (FULL, REUSE, AttentionPlan, HeadCache, StepAttention, choose_greedy, choose_ilp,
                                model_layout, residual_window_plan, sample_with_plan, search_plan)
from jquant.ditfastattn.search import choose_brute_force
from jquant.models import sd3
from jquant.sampling import sample
from jquant.testing.hf_reference import relative_error

CFG = sd3.SD3Config(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=3, joint_attention_dim=12, caption_projection_dim=48, pooled_projection_dim=10,
                    pos_embed_max_size=8)
SHAPE, TEXT, STEPS, GUIDANCE = (2, 8, 8, 4), 6, 4, 2.5


@pytest.fixture(scope="module")
def setting():
    model = sd3.init_model(CFG, jax.random.key(0))
    # the init's small weights leave attention almost without effect; larger ones make compression visible
    nnx.update(model, jax.tree.map(lambda p: p * 8.0, nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(1)
    cond = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, TEXT, 12), (2, 10)))
    uncond = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, TEXT, 12), (2, 10)))
    return model, cond, uncond, model_layout(model, SHAPE, TEXT)


def _velocity(model):
    return lambda x, t, c: model.flow_velocity(x, t, *c)


def _sample(model, cond, uncond, plan=None, mode="compute", seed=3):
    options = dict(key=jax.random.key(seed), shape=SHAPE, steps=STEPS, guidance=GUIDANCE, uncond=uncond)
    if plan is None:
        return np.asarray(sample(_velocity(model), cond, **options))
    return np.asarray(sample_with_plan(model, cond, plan=plan, mode=mode, **options))


def _random_plan(layout, seed):
    rng = np.random.default_rng(seed)
    windows = rng.choice([FULL, REUSE, 1, 5, 20], size=(STEPS, 2, 3)).astype(np.int32)
    windows[0] = np.where(windows[0] == REUSE, FULL, windows[0])
    return AttentionPlan.build(windows, layout)


def test_all_full_plan_is_the_plain_sampler(setting):
    model, cond, uncond, layout = setting
    base = _sample(model, cond, uncond)
    full = AttentionPlan.full(STEPS, 2, 3, layout)
    # the computed and masked paths run one compiled program per step, the plain sampler one scan: float32 rounding
    # only, compounded over the steps (measured relative to the sample's largest value)
    for mode in ("compute", "masked"):
        assert relative_error(_sample(model, cond, uncond, full, mode), base) < 2e-5, mode


@pytest.mark.parametrize("seed", [0, 1])
def test_computed_and_masked_runs_agree_and_compression_changes_the_output(setting, seed):
    model, cond, uncond, layout = setting
    plan = _random_plan(layout, seed)
    computed = _sample(model, cond, uncond, plan, "compute")
    np.testing.assert_allclose(_sample(model, cond, uncond, plan, "masked"), computed, atol=2e-5)
    assert not np.allclose(computed, _sample(model, cond, uncond), atol=1e-3)
    wa_rs = residual_window_plan(STEPS, 2, 3, layout, factor=8, refresh_every=2)
    np.testing.assert_allclose(_sample(model, cond, uncond, wa_rs, "masked"),
                               _sample(model, cond, uncond, wa_rs, "compute"), atol=2e-5)


def test_reused_heads_return_the_cached_output_bitwise_and_residuals_follow_v1(setting):
    _, _, _, layout = setting
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, layout.length, 3, 16)), jnp.float32) for _ in range(3))
    cache = HeadCache(jnp.asarray(rng.normal(size=(1, 2, layout.length, 3, 16)), jnp.float32),
                      jnp.asarray(rng.normal(size=(1, 2, layout.length, 3, 16)), jnp.float32))
    for windows in (np.array([[REUSE, 3, FULL]]), jnp.array([[REUSE, 3, FULL]])):  # computed and masked paths
        residual = np.array([[0, 1, 0]], np.int8)
        hook = StepAttention(windows, residual if isinstance(windows, np.ndarray) else jnp.asarray(residual), cache,
                             layout, "arrow")
        out = np.asarray(hook(0, q, k, v))
        np.testing.assert_array_equal(out[:, :, 0], np.asarray(cache.outputs[0, :, :, 0]))
        from jquant import ops
        local = np.asarray(ops.local_attention(q, k, v, [3, 3, 3], n_text=TEXT, text_start=layout.n_image))
        np.testing.assert_allclose(out[:, :, 1], local[:, :, 1] + np.asarray(cache.residuals[0, :, :, 1]), atol=1e-5)
        new = hook.new_cache()
        np.testing.assert_array_equal(np.asarray(new.outputs[0]), out)


def test_ilp_is_the_brute_force_optimum_and_monotone_in_the_budget():
    rng = np.random.default_rng(0)
    saving = np.array([1.0, 0.6, 0.4, 0.2])
    for _ in range(30):
        heads = int(rng.integers(1, 6))
        rse = rng.uniform(0, 0.3, size=(heads, 4)) * rng.choice([0.1, 1.0], size=(heads, 1))
        budget = float(rng.uniform(0.01, 0.5))
        previous = 0.0
        for b in (budget, 1.5 * budget, 3 * budget):
            for prefilter in (True, False):
                choice = choose_ilp(rse, saving, b, prefilter=prefilter)
                used = [(h, m) for h, m in enumerate(choice) if m >= 0]
                assert sum(rse[h, m] for h, m in used) <= b + 1e-12
                value = sum(saving[m] for _, m in used)
                assert value == pytest.approx(choose_brute_force(rse, saving, b, prefilter=prefilter), abs=1e-9)
                greedy = choose_greedy(rse, saving, b, prefilter=prefilter)
                g_used = [(h, m) for h, m in enumerate(greedy) if m >= 0]
                assert sum(rse[h, m] for h, m in g_used) <= b + 1e-12
                assert sum(saving[m] for _, m in g_used) <= value + 1e-9
            assert value >= previous - 1e-12
            previous = value


def test_search_plan_structure_and_a_tiny_budget_compresses_nothing(setting):
    model, cond, uncond, layout = setting
    options = dict(key=jax.random.key(3), shape=SHAPE, steps=STEPS, guidance=GUIDANCE, uncond=uncond)
    tiny, details = search_plan(model, cond, budget=1e-9, **options)
    assert (tiny.windows == FULL).all()
    np.testing.assert_allclose(_sample(model, cond, uncond, tiny), _sample(model, cond, uncond), rtol=1e-5, atol=1e-5)
    loose, details = search_plan(model, cond, budget=1.0, **options)
    assert (loose.windows[0] == FULL).all() and np.isin(loose.windows, [FULL, *details["candidates"]]).all()
    assert loose.attention_fraction() < 1.0
    # the recorded errors are the RSE the plan was chosen from: every chosen head's error fits the budget
    for t in range(1, STEPS):
        for layer in range(2):
            chosen = [(h, details["candidates"].index(w)) for h, w in enumerate(loose.windows[t, layer]) if w != FULL]
            assert sum(details["rse"][t, layer, h, m] for h, m in chosen) <= 1.0 + 1e-9
    greedy, _ = search_plan(model, cond, budget=1.0, solver="greedy", **options)
    assert greedy.info != loose.info


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.1, True])
def test_budgets_outside_the_unit_interval_are_refused(setting, budget):
    model, cond, uncond, _ = setting
    with pytest.raises(ValueError, match=r"budget=.* must be a number in \(0, 1\]"):
        search_plan(model, cond, budget=budget, key=jax.random.key(0), shape=SHAPE, steps=STEPS)


def test_a_plan_for_another_setting_is_refused(setting):
    model, cond, uncond, layout = setting
    plan = AttentionPlan.full(STEPS + 1, 2, 3, layout)
    with pytest.raises(ValueError, match="sample with 5 steps"):
        _sample(model, cond, uncond, plan)
    short = tuple(c[:, :4] if c.ndim == 3 else c for c in cond)
    with pytest.raises(ValueError, match="another resolution or text length"):
        sample_with_plan(model, short, plan=AttentionPlan.full(STEPS, 2, 3, layout), key=jax.random.key(0),
                         shape=SHAPE, steps=STEPS)


def test_flux_text_first_layout_runs_plans_and_searches():
    from jquant.models import flux

    cfg = flux.FluxConfig(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                          joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=False,
                          axes_dims_rope=(2, 2, 4))
    model = flux.init_model(cfg, jax.random.key(0))
    nnx.update(model, jax.tree.map(lambda p: p * 8.0, nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(2)
    cond = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 12), (2, 10)))
    shape = (2, 8, 8, 2)
    layout = model_layout(model, shape, 5)
    assert (layout.n_image, layout.n_text, layout.text_start) == (16, 5, 0)
    options = dict(key=jax.random.key(1), shape=shape, steps=3)
    plain = np.asarray(sample(_velocity(model), cond, **options))
    full = AttentionPlan.full(3, 3, 2, layout)
    # float32 rounding only (one program per step vs one scan), amplified by the scaled qk-norm weights
    np.testing.assert_allclose(np.asarray(sample_with_plan(model, cond, plan=full, **options)), plain, rtol=1e-4,
                               atol=1e-4)
    plan, _ = search_plan(model, cond, budget=1.0, **options)
    assert plan.layers == 3 and plan.attention_fraction() < 1.0
    computed = np.asarray(sample_with_plan(model, cond, plan=plan, mode="compute", **options))
    np.testing.assert_allclose(np.asarray(sample_with_plan(model, cond, plan=plan, mode="masked", **options)), computed,
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(computed, plain, atol=1e-3)


def test_kernel_mode_runs_the_pallas_arrow_kernel_and_matches_the_masked_run(setting):
    model, cond, uncond, layout = setting
    plan = _random_plan(layout, 3)
    kernel = _sample(model, cond, uncond, plan, "kernel")  # interpret mode on CPU
    np.testing.assert_allclose(kernel, _sample(model, cond, uncond, plan, "masked"), atol=2e-5)
    band = residual_window_plan(STEPS, 2, 3, layout, factor=8, refresh_every=2)
    with pytest.raises(ValueError, match="kernel' runs arrow plans"):
        _sample(model, cond, uncond, band, "kernel")
