"""jquant.ops against float64 numpy references on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops


def _attention_reference(q, k, v, mask):
    """Per-head loop in float64: query head h uses key/value head h // (H // K)."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for hh in range(h):
        kk, vv = k[:, :, hh // groups], v[:, :, hh // groups]
        logits = np.einsum("btd,bsd->bts", q[:, :, hh], kk) / np.sqrt(d)
        logits = np.where(mask, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, hh] = np.einsum("bts,bsd->btd", p, vv)
    return out


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (6, 2, None), (4, 1, 3)])
def test_attention_matches_reference(heads, kv_heads, window):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, t, d = 2, 7, 8
    q = rng.normal(size=(b, t, heads, d))
    k = rng.normal(size=(b, t, kv_heads, d))
    v = rng.normal(size=(b, t, kv_heads, d))
    pos = np.broadcast_to(np.arange(t), (b, t))
    mask = np.asarray(ops.causal_mask(pos, pos, sliding_window=window))
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    expected_mask = (j <= i) & ((j > i - window) if window else True)
    np.testing.assert_array_equal(mask, np.broadcast_to(expected_mask, (b, t, t)))
    got = ops.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), mask)
    np.testing.assert_allclose(np.asarray(got), _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_invalid_cache_slots_are_ignored():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 1, 2, 4)).astype(np.float32)
    k = rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    v = rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    k_pos = np.arange(5)[None]
    valid = k_pos < 3
    mask = ops.causal_mask(np.array([[10]]), k_pos, valid)
    np.testing.assert_allclose(np.asarray(ops.attention(q, k, v, mask)),
                               np.asarray(ops.attention(q, k[:, :3], v[:, :3], np.ones((1, 1, 3), bool))), rtol=1e-6)


def test_linear_matches_numpy_and_checks_shapes():
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(5, 6)), rng.normal(size=(6,))
    got = ops.linear(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), x @ w + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[in, out\]"):
        ops.linear(x.astype(np.float32), w.T.astype(np.float32))


def test_float64_stays_float64():
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(2)
        x, w = rng.normal(size=(2, 3)), rng.normal(size=(3, 4))
        y = ops.linear(x, w)
        assert y.dtype == np.float64
        np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-13)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name", ["int8-tensor-asym", "int8-asym"])
def test_dynamic_activation_quantization_does_not_depend_on_the_batch(name):
    """Per-tensor dynamic formats take one scale per sequence; per-token formats are per token anyway."""
    from jquant.formats import fake_quantize, get_format
    from jquant.ops.linear import quantize_activation

    fmt = get_format(name)
    x = np.random.default_rng(0).normal(size=(3, 7, 16)).astype(np.float32)
    x[1] *= 50.0  # a loud sequence must not coarsen its neighbours' steps
    batched = np.asarray(quantize_activation(jnp.asarray(x), fmt))
    for b in range(3):
        np.testing.assert_array_equal(batched[b], np.asarray(fake_quantize(jnp.asarray(x[b]), fmt, axis=-1)))
