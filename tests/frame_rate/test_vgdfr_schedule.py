"""VGDFR's schedulers, merge bookkeeping, merging and interpolation (spec ``vgdfr.md`` §3.2(d, e, h), §5 invariants
4, 5, 9) on synthetic SSIM arrays and random frames, against the official pseudo-code transcribed literally here
and against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.frame_rate.interpolate import linear_interpolate
from jquant.frame_rate.merge import merge_frames, renoise
from jquant.frame_rate.schedule import MergePlan, keep_ratio_schedule, threshold_schedule, uniform_plan


def official(s1, s2, s3, tau: float, allow4x4: bool) -> tuple[set[int], set[int], list[tuple[int, int]]]:
    """The official threshold scheduler (spec §3.2(d)), c = 4, as written: (dropped video frames, dropped latents,
    merges)."""
    t = len(s1) + 1
    frames, latents, merges, i = set(), set(), [], 1
    while i < t - 9:
        if allow4x4 and i < t - 17 and min(min(s1[i + g], s2[i + g], s3[i + g], s1[i + g + 1], s2[i + g + 1],
                                               s1[i + g + 2]) for g in (0, 4, 8, 12)) > tau:
            merges.append((i, 4))
            frames |= {i + g + k for g in (0, 4, 8, 12) for k in (1, 2, 3)}
            latents |= {1 + (i + 4) // 4, 1 + (i + 8) // 4, 1 + (i + 12) // 4}
            i += 16
            continue
        if min(s1[i + g] for g in (0, 2, 4, 6)) > tau:
            merges.append((i, 2))
            frames |= {i + g + 1 for g in (0, 2, 4, 6)}
            latents.add(1 + (i + 4) // 4)
        i += 8
    return frames, latents, merges


def ssims(frames: int, rng, low: float, high: float) -> list[np.ndarray]:
    return [rng.uniform(low, high, frames - d) for d in (1, 2, 3)]


@pytest.mark.parametrize("frames,tau,low,high", [(33, 0.8, 0.6, 1.0), (65, 0.45, 0.35, 0.75), (49, 0.3, 0.2, 0.9)])
def test_threshold_schedule_is_the_official_pseudo_code(frames, tau, low, high):
    rng = np.random.default_rng(frames)
    for _ in range(20):
        s = ssims(frames, rng, low, high)
        plan = threshold_schedule(s, tau)
        dropped, latents, merges = official(*s, tau, allow4x4=tau < 0.5)
        assert plan.merges == tuple(merges)
        assert set(range(frames)) - set(plan.kept_frames) == dropped
        assert set(plan.dropped_latents) == latents
        assert len(plan.kept_latents) == (len(plan.kept_frames) - 1) // 4 + 1 == plan.latent_frames - len(latents)
        assert len(plan.kept_frames) % 4 == 1
        # each kept latent is the latent of its kept video frame: 1 + (v - 1) // 4 for v >= 1 (frames 4j-3..4j)
        assert [0] + [1 + (v - 1) // 4 for v in plan.kept_frames[1::4]] == list(plan.kept_latents)


def test_threshold_cases_from_the_spec():
    t = 41
    high = [np.full(t - d, 0.95) for d in (1, 2, 3)]
    plan = threshold_schedule(high, 0.75)  # τ >= 0.5: 2x4 merges only, every window from frame 1
    assert plan.merges == tuple((i, 2) for i in range(1, t - 9, 8))
    assert 0 in plan.kept_frames and all(v in plan.kept_frames for v in range(t - 8, t))  # no merge starts in the tail
    assert len(plan.kept_frames) % 4 == 1
    assert threshold_schedule([np.full(t - d, 0.3) for d in (1, 2, 3)], 0.75).empty
    assert threshold_schedule(high, 1.0).empty  # SSIM never exceeds 1: τ = 1 merges nothing
    mid = [np.full(t - d, 0.45) for d in (1, 2, 3)]
    assert {span for _, span in threshold_schedule(mid, 0.4).merges} == {4}
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, 1\\]"):
        threshold_schedule(high, 1.5)


def test_keep_ratio_search_is_monotone_and_lands_within_one_merge():
    rng = np.random.default_rng(0)
    frames = 65
    for _ in range(5):
        s = ssims(frames, rng, 0.3, 1.0)
        s = [np.sort(x)[::-1] if rng.random() < 0.5 else x for x in s]
        reached = []
        for r in np.linspace(0.3, 1.0, 15):
            plan, tau = keep_ratio_schedule(s, float(r))
            assert plan == threshold_schedule(s, tau, allow_c_merge=tau < 0.5)
            reached.append(plan.keep_ratio)
            ceiling = threshold_schedule(s, 0.99).keep_ratio
            if r <= ceiling:
                assert r <= plan.keep_ratio <= r + 12 / frames + 1e-9  # one 4x4 merge drops 12 frames
        assert np.all(np.diff(reached) >= 0)
    with pytest.raises(ValueError, match="keep_ratio must be in \\(0, 1\\]"):
        keep_ratio_schedule(s, 0.0)


def test_merge_plan_groups_and_refusals():
    plan = MergePlan(41, 4, ((1, 2), (9, 4)))
    assert plan.groups[1:5] == ((1, 2), (3, 4), (5, 6), (7, 8))
    assert plan.groups[5:9] == ((9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20), (21, 22, 23, 24))
    assert sorted(v for g in plan.groups for v in g) == list(range(41))
    assert plan.dropped_latents == (2, 4, 5, 6) and plan.kept_latents == (0, 1, 3, 7, 8, 9, 10)
    for bad in (((2, 2),), ((1, 3),), ((1, 2), (5, 2)), ((33, 2),)):
        with pytest.raises(ValueError, match="MergePlan.merges"):
            MergePlan(41, 4, bad)
    with pytest.raises(ValueError, match="MergePlan.frames must be 1 \\+ 4k"):
        MergePlan(40, 4)
    uniform = uniform_plan(65, 49)
    assert len(uniform.kept_frames) == 49 and {span for _, span in uniform.merges} == {2}


def test_merge_frames_and_renoise_against_numpy():
    rng = np.random.default_rng(1)
    plan = MergePlan(33, 4, ((1, 2), (9, 4)))
    frames = rng.standard_normal((2, 33, 5, 4, 3)).astype(np.float32)
    want = np.stack([frames[:, list(g)].mean(axis=1) for g in plan.groups], axis=1)
    np.testing.assert_allclose(np.asarray(merge_frames(jnp.asarray(frames), plan)), want, rtol=1e-6, atol=1e-6)
    z = rng.standard_normal((2, len(plan.kept_latents), 3, 3, 4)).astype(np.float32)
    noise = rng.standard_normal((2, plan.latent_frames, 3, 3, 4)).astype(np.float32)
    got = np.asarray(renoise(jnp.asarray(z), jnp.asarray(noise), plan, 0.7))
    np.testing.assert_allclose(got, 0.7 * noise[:, list(plan.kept_latents)] + 0.3 * z, rtol=1e-6, atol=1e-6)


def test_linear_interpolator_is_np_interp_between_kept_frames():
    rng = np.random.default_rng(2)
    plan = MergePlan(41, 4, ((1, 2), (17, 4)))
    kept = np.asarray(plan.kept_frames)
    frames = rng.standard_normal((1, len(kept), 4, 3, 3)).astype(np.float32)
    got = np.asarray(linear_interpolate(jnp.asarray(frames), plan))
    flat = frames.reshape(len(kept), -1)
    want = np.stack([np.interp(np.arange(41), kept, flat[:, j]) for j in range(flat.shape[1])], axis=1)
    np.testing.assert_allclose(got.reshape(41, -1), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, kept], frames)  # kept frames are copied exactly
    with pytest.raises(ValueError, match="linear_interpolate: frames must be"):
        linear_interpolate(jnp.asarray(frames[:, :-1]), plan)
