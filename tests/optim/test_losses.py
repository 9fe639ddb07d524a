"""KL-Top and full KL distillation losses against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.losses import kl_divergence, kl_top


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_kl_top(student, teacher, k, mask=None):
    """Float64: per position Σ_{i ∈ top-k(teacher)} p_i (log p_i − log q_i), then the mean over valid positions."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    log_p, log_q = _log_softmax(teacher), _log_softmax(student)
    top = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    lp, lq = np.take_along_axis(log_p, top, -1), np.take_along_axis(log_q, top, -1)
    per_position = (np.exp(lp) * (lp - lq)).sum(-1)
    valid = np.ones(per_position.shape, bool) if mask is None else np.asarray(mask, bool)
    return per_position[valid].mean()


def _logits(seed, shape, scale=3.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def test_identical_logits_give_exactly_zero():
    logits = jnp.asarray(_logits(0, (2, 5, 64)))
    assert float(kl_top(logits, logits, k=10)) == 0.0
    assert float(kl_divergence(logits, logits)) == 0.0


def test_kl_top_matches_float64_reference():
    student, teacher = _logits(1, (3, 4, 50)), _logits(2, (3, 4, 50))
    for k in (1, 7, 50):
        got = float(kl_top(jnp.asarray(student), jnp.asarray(teacher), k=k))
        np.testing.assert_allclose(got, _reference_kl_top(student, teacher, k), rtol=1e-5)


def test_k_equal_to_vocab_is_full_kl():
    student, teacher = _logits(3, (6, 40)), _logits(4, (6, 40))
    p, log_p, log_q = np.exp(_log_softmax(teacher.astype(np.float64))), _log_softmax(teacher.astype(np.float64)), \
        _log_softmax(student.astype(np.float64))
    want = (p * (log_p - log_q)).sum(-1).mean()
    full = float(kl_divergence(jnp.asarray(student), jnp.asarray(teacher)))
    np.testing.assert_allclose(full, want, rtol=1e-5)
    np.testing.assert_allclose(float(kl_top(jnp.asarray(student), jnp.asarray(teacher), k=40)), full, rtol=1e-6)


@pytest.mark.parametrize("k", [5, 30])
def test_gradient_flows_into_the_student_only(k):
    # dL/ds_j = (q_j Σ_{i∈I} p_i − p_j [j ∈ I]) / positions ; with k = V this is (q − p) / positions
    student, teacher = _logits(5, (4, 30)), _logits(6, (4, 30))
    jax.config.update("jax_enable_x64", True)
    try:
        s, t = jnp.asarray(student, jnp.float64), jnp.asarray(teacher, jnp.float64)
        grad_s, grad_t = jax.grad(kl_top, argnums=(0, 1))(s, t, k)
        grad_s_full = jax.grad(kl_divergence)(s, t)
    finally:
        jax.config.update("jax_enable_x64", False)
    p, q = np.exp(_log_softmax(teacher.astype(np.float64))), np.exp(_log_softmax(student.astype(np.float64)))
    in_top = np.zeros_like(p, bool)
    np.put_along_axis(in_top, np.argsort(-teacher, -1)[:, :k], True, -1)
    mass = np.where(in_top, p, 0).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(grad_s), (q * mass - np.where(in_top, p, 0)) / 4, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grad_s_full), (q - p) / 4, atol=1e-12)
    assert np.all(np.asarray(grad_t) == 0)


def test_mask_selects_positions():
    student, teacher = _logits(7, (2, 6, 20)), _logits(8, (2, 6, 20))
    mask = np.random.default_rng(9).random((2, 6)) < 0.5
    mask[0, 0] = True
    got = float(kl_top(jnp.asarray(student), jnp.asarray(teacher), k=8, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, _reference_kl_top(student, teacher, 8, mask), rtol=1e-5)
    # masked positions do not matter; a 0/1 integer mask works the same
    scrambled = np.where(mask[..., None], student, _logits(10, student.shape, scale=50.0))
    again = float(kl_top(jnp.asarray(scrambled), jnp.asarray(teacher), k=8, mask=jnp.asarray(mask, jnp.int32)))
    assert again == got
    full = float(kl_divergence(jnp.asarray(student), jnp.asarray(teacher), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(full, _reference_kl_top(student, teacher, 20, mask), rtol=1e-5)
    assert float(kl_top(jnp.asarray(student), jnp.asarray(teacher), k=8, mask=jnp.zeros((2, 6), bool))) == 0.0


def test_bf16_inputs_are_computed_in_float32():
    student, teacher = jnp.asarray(_logits(11, (3, 64)), jnp.bfloat16), jnp.asarray(_logits(12, (3, 64)), jnp.bfloat16)
    got = kl_top(student, teacher, k=16)
    assert got.dtype == jnp.float32
    assert got == kl_top(student.astype(jnp.float32), teacher.astype(jnp.float32), k=16)
    np.testing.assert_allclose(float(got), _reference_kl_top(np.asarray(student.astype(jnp.float32)),
                                                             np.asarray(teacher.astype(jnp.float32)), 16), rtol=1e-5)
    assert kl_divergence(student, teacher).dtype == jnp.float32


def test_teacher_zero_probabilities_contribute_nothing():
    # a padded vocabulary: teacher logits −inf on the pad entries must not produce NaN
    student, teacher = _logits(13, (4, 24)), _logits(14, (4, 24))
    teacher[:, 20:] = -np.inf
    s, t = jnp.asarray(student), jnp.asarray(teacher)
    full = kl_divergence(s, t)
    log_p = _log_softmax(teacher[:, :20].astype(np.float64))
    log_q = _log_softmax(student.astype(np.float64))[:, :20]
    np.testing.assert_allclose(float(full), (np.exp(log_p) * (log_p - log_q)).sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(kl_top(s, t, k=24)), float(full), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(jax.grad(kl_top)(s, t, 24))))


def test_jit_with_static_k():
    student, teacher = jnp.asarray(_logits(15, (2, 3, 32))), jnp.asarray(_logits(16, (2, 3, 32)))
    jitted = jax.jit(kl_top, static_argnames="k")
    np.testing.assert_allclose(float(jitted(student, teacher, k=5)), float(kl_top(student, teacher, k=5)), rtol=1e-6)


def test_rejects_bad_arguments():
    logits = jnp.zeros((2, 10))
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match="1 <= k <= vocabulary size 10"):
            kl_top(logits, logits, k=k)
    with pytest.raises(ValueError, match="share one shape"):
        kl_top(jnp.zeros((2, 9)), jnp.zeros((2, 10)), k=3)
    with pytest.raises(ValueError, match="share one shape"):
        kl_divergence(jnp.zeros((3, 10)), logits)
    with pytest.raises(ValueError, match="leading shape"):
        kl_divergence(logits, logits, mask=jnp.ones((2, 10), bool))
