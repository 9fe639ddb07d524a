"""jquant.ops.experts: routing, dropless grouping, grouped matmul (blocked CPU path and ragged_dot) and combine,
against float64 numpy loops on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.formats import ExpertPartition, dequantize, get_format, quantize
from jquant.ops import experts as X


def _numpy_moe(x, logits, w, top_k, normalize, scale):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((x.shape[0], w.shape[2]))
    for t in range(x.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:top_k]
        c = p[t, top] / (p[t, top].sum() if normalize else 1.0) * scale
        for j, e in enumerate(top):
            out[t] += c[j] * (x[t] @ w[e])
    return out


@pytest.mark.parametrize("normalize, scale", [(True, 1.0), (False, 2.5)])
def test_route_group_matmul_combine_equal_numpy(normalize, scale):
    rng = np.random.default_rng(0)
    n, d, f, e, k = 37, 16, 12, 5, 2
    x, logits, w = rng.normal(size=(n, d)), rng.normal(size=(n, e)), rng.normal(size=(e, d, f))
    routing = X.route(jnp.asarray(logits, jnp.float32), k, normalize=normalize, scale=scale)
    sums = np.asarray(routing.weights).sum(-1)
    assert np.allclose(sums, scale) if normalize else np.all(sums < scale)
    grouping = X.sort_by_expert(routing.experts, e)
    assert int(grouping.group_sizes.sum()) == n * k
    rows = jnp.asarray(x, jnp.float32)[grouping.token]
    for block in (None, 4, 64):
        out = X.grouped_matmul(rows, jnp.asarray(w, jnp.float32), grouping.group_sizes, block=block)
        y = X.combine(out, routing, grouping, n)
        np.testing.assert_allclose(np.asarray(y), _numpy_moe(x, logits, w, k, normalize, scale), rtol=1e-4, atol=1e-4)


def test_blocked_path_equals_ragged_dot_with_empty_experts():
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([3, 0, 9, 0, 1], jnp.int32)
    x = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 8, 6)), jnp.float32)
    ragged = jax.lax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.HIGHEST)
    for block in (1, 2, 8, 32):
        np.testing.assert_allclose(np.asarray(X.grouped_matmul(x, w, sizes, block=block)), np.asarray(ragged), rtol=1e-6, atol=1e-6)
    gram = X.grouped_gram(x, sizes, block=4)
    np.testing.assert_allclose(np.asarray(gram[2]), np.asarray(x[3:12].T @ x[3:12]), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gram[1]) == 0)


def test_quantized_and_partitioned_weights_dequantize_per_expert():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(4, 32, 8)), jnp.float32)
    sizes = jnp.asarray([2, 3, 0, 4], jnp.int32)
    x = jnp.asarray(rng.normal(size=(9, 32)), jnp.float32)
    q = quantize(w, get_format("int4-g16-asym"), axis=1)
    ref = jax.lax.ragged_dot(x, dequantize(q), sizes, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(X.grouped_matmul(x, q, sizes)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    part = ExpertPartition(parts=(quantize(w[np.array([3, 0])], get_format("int8"), axis=1), w[np.array([1, 2])]),
                           experts=((3, 0), (1, 2)))
    full = np.asarray(part.dequantize(jnp.float32))
    np.testing.assert_array_equal(full[1:3], np.asarray(w[1:3]))
    np.testing.assert_array_equal(full[0], np.asarray(dequantize(quantize(w[0], get_format("int8"), axis=0))))
    with pytest.raises(ValueError, match="exactly once"):
        ExpertPartition(parts=(w[:2], w[2:]), experts=((0, 1), (1, 2)))


def test_per_expert_activation_formats():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
    sizes = jnp.asarray([2, 4], jnp.int32)
    out = X.quantize_expert_activations(x, sizes, (None, get_format("int4")))
    np.testing.assert_array_equal(np.asarray(out[:2]), np.asarray(x[:2]))
    from jquant.ops.linear import quantize_activation

    np.testing.assert_array_equal(np.asarray(out[2:]), np.asarray(quantize_activation(x[2:], get_format("int4"))))


def test_route_refuses_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=5"):
        X.route(jnp.zeros((2, 4)), 5, normalize=True)


def test_gradients_equal_a_dense_per_token_reference():
    """Training goes through routing, grouping, the blocked grouped matmul and combine: their gradients (weights,
    inputs and router logits) equal those of a dense computation that evaluates every expert for every token."""
    rng = np.random.default_rng(4)
    n, d, f, e, k = 23, 8, 6, 4, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(e, d, f)), jnp.float32)

    def grouped(x, logits, w):
        routing = X.route(logits, k, normalize=True)
        grouping = X.sort_by_expert(routing.experts, e)
        out = X.grouped_matmul(x[grouping.token], w, grouping.group_sizes, block=4)
        return jnp.sum(jnp.sin(X.combine(out, routing, grouping, n)))

    def dense(x, logits, w):
        p = jax.nn.softmax(logits, axis=-1)
        top, idx = jax.lax.top_k(p, k)
        gates = jnp.zeros_like(p).at[jnp.arange(n)[:, None], idx].set(top / top.sum(-1, keepdims=True))
        return jnp.sum(jnp.sin(jnp.einsum("te,ted->td", gates, jnp.einsum("td,edf->tef", x, w))))

    for got, want in zip(jax.grad(grouped, argnums=(0, 1, 2))(x, logits, w), jax.grad(dense, argnums=(0, 1, 2))(x, logits, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_pallas_mode_uses_the_grouped_kernel_and_falls_back_when_shapes_do_not_tile():
    from jquant import ops

    rng = np.random.default_rng(5)
    sizes = jnp.asarray([5, 0, 11, 4], jnp.int32)
    x = jnp.asarray(rng.normal(size=(20, 128)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 128, 64)), jnp.float32)
    q = quantize(w, get_format("int4-g128-asym"), axis=1)
    part = ExpertPartition(parts=(quantize(w[np.array([0, 2])], get_format("int8"), axis=1),
                                  quantize(w[np.array([1, 3])], get_format("int4-g128-asym"), axis=1)),
                           experts=((0, 2), (1, 3)))
    for weight in (q, part):
        xla = X.grouped_matmul(x, weight, sizes)
        with ops.force_path("pallas"), ops.record_dispatch() as records:
            fast = X.grouped_matmul(x, weight, sizes)
        assert [r.path for r in records] == ["pallas-grouped-matmul"]
        np.testing.assert_allclose(np.asarray(fast), np.asarray(xla), rtol=1e-5, atol=1e-4)
    odd = quantize(jnp.asarray(rng.normal(size=(4, 128, 40)), jnp.float32), get_format("int8"), axis=1)
    with ops.force_path("pallas"), ops.record_dispatch() as records:
        X.grouped_matmul(x, odd, sizes)
    assert records[0].path == "xla-dequantize" and "does not fit" in records[0].reason
