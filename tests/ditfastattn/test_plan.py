"""AttentionPlan: FLOP counts from the masks, validation, the file, baselines."""

from __future__ import annotations

import numpy as np
import pytest

from jquant.ditfastattn import (FULL, REUSE, AttentionPlan, JointLayout, arrow_pairs, band_pairs, layer_reuse_plan,
                                residual_window_plan, window_plan)
from jquant.ops.mask import Arrow, Band

LAYOUT = JointLayout(n_image=20, n_text=7, text_start=20)


@pytest.mark.parametrize("half_width", [1, 2, 5, 19, 20])
@pytest.mark.parametrize("text_start", [0, 20])
def test_pair_counts_are_the_masks_allowed_elements(half_width, text_start):
    layout = JointLayout(20, 7, text_start)
    s = layout.length
    assert arrow_pairs(layout, half_width) == int(Arrow(7, half_width, text_start).dense(s, s).sum())
    assert band_pairs(layout, half_width) == int(Band(half_width).dense(s, s).sum())


def test_flops_and_fraction_follow_the_plan():
    rng = np.random.default_rng(0)
    windows = rng.choice([FULL, REUSE, 1, 3], size=(4, 2, 3)).astype(np.int32)
    windows[0] = FULL
    plan = AttentionPlan.build(windows, LAYOUT)
    s = LAYOUT.length
    expected = sum(s * s if w == FULL else 0 if w == REUSE else int(Arrow(7, int(w), 20).dense(s, s).sum())
                   for w in windows.ravel())
    assert plan.attention_flops(head_dim=16, batch=2) == expected * 4 * 16 * 2
    assert plan.attention_fraction() == pytest.approx(expected / (windows.size * s * s))
    assert AttentionPlan.full(4, 2, 3, LAYOUT).attention_fraction() == 1.0
    counts = plan.counts()
    assert counts["full"] + counts["reuse"] + counts["local"] == windows.size


def test_save_load_round_trip(tmp_path):
    plan = window_plan(5, 2, 3, LAYOUT, factor=4, pattern="arrow")
    plan.save(tmp_path)
    loaded = AttentionPlan.load(tmp_path)
    np.testing.assert_array_equal(loaded.windows, plan.windows)
    assert (loaded.layout, loaded.pattern, loaded.info) == (plan.layout, plan.pattern, plan.info)
    assert AttentionPlan.load(tmp_path / "nowhere") is None
    (tmp_path / "attention_plan.json").write_text("{")
    with pytest.raises(ValueError, match="attention_plan.json: not valid JSON"):
        AttentionPlan.load(tmp_path)


def test_bad_plans_are_refused():
    ok = np.full((3, 2, 2), FULL, np.int32)
    with pytest.raises(ValueError, match="larger than the sequence"):
        AttentionPlan.build(np.where(np.arange(3)[:, None, None] > 0, 21, ok), LAYOUT)
    with pytest.raises(ValueError, match="step 0"):
        AttentionPlan.build(np.full((3, 2, 2), REUSE), LAYOUT)
    with pytest.raises(ValueError, match="no earlier step refreshed"):
        AttentionPlan.build(np.full((3, 2, 2), 2), LAYOUT, residual=np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="-3"):
        AttentionPlan.build(np.full((3, 2, 2), -3), LAYOUT)
    plan = AttentionPlan.build(ok, LAYOUT)
    with pytest.raises(ValueError, match="2 heads but the run has 3"):
        plan.check_model(steps=3, layers=2, heads=3, layout=LAYOUT)
    with pytest.raises(ValueError, match="3 steps but the run has 4"):
        plan.check_model(steps=4, layers=2, heads=2, layout=LAYOUT)
    with pytest.raises(ValueError, match="another resolution"):
        plan.check_model(steps=3, layers=2, heads=2, layout=JointLayout(12, 7, 12))


def test_baselines_have_the_v1_structure():
    wa_rs = residual_window_plan(6, 2, 3, LAYOUT, factor=4, refresh_every=3)
    np.testing.assert_array_equal(wa_rs.residual[:, 0, 0], [2, 1, 1, 2, 1, 1])
    assert wa_rs.pattern == "band" and (wa_rs.windows == 2).all()
    ast = layer_reuse_plan(5, 2, 3, LAYOUT, every=2)
    np.testing.assert_array_equal(ast.windows[:, 1, 2], [FULL, REUSE, FULL, REUSE, FULL])
    assert ast.attention_fraction() == pytest.approx(3 / 5)
    # a refresh step scores the full matrix and the window: WA-RS costs more than the window alone
    assert wa_rs.attention_fraction() > window_plan(6, 2, 3, LAYOUT, factor=4).attention_fraction()
