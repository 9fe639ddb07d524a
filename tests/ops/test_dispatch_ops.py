"""Dispatch keyed by op: records carry the op, kernels register per op, explain answers per op."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops
from jquant.formats import get_format, quantize
from jquant.ops import dispatch


def _qkv(rng, t=5, s=5):
    return tuple(jnp.asarray(rng.standard_normal((1, n, 2, 4)), jnp.float32) for n in (t, s, s))


def test_records_carry_the_op_and_attention_is_recorded_only_when_asked():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    w_lin = quantize(jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), get_format("int8"), axis=0)
    w_conv = quantize(jnp.asarray(rng.standard_normal((24, 4)), jnp.float32), get_format("int8"), axis=0)
    stack = quantize(jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32), get_format("int8"), axis=1)
    q, k, v = _qkv(rng)

    def run():
        ops.linear(x, w_lin)
        ops.conv(x, w_conv, kernel_size=3)
        ops.conv(x, jnp.ones((24, 4)), kernel_size=3)  # a float weight has one path: not recorded
        ops.grouped_matmul(x[0], stack, jnp.array([4, 2], jnp.int32))
        ops.attention(q, k, v, ops.Causal())

    with ops.force_path("xla"), ops.record_dispatch() as default, ops.record_dispatch(dispatch.OPS) as every:
        run()
    assert [r.op for r in default] == ["linear", "conv", "grouped_matmul"]
    assert [r.op for r in every] == ["linear", "conv", "grouped_matmul", "attention"]
    assert {r.path for r in default} == {dispatch.XLA_PATH}
    attention = every[-1]
    assert (attention.path, attention.x_shape, attention.w_shape) == (dispatch.XLA_ATTENTION_PATH, (1, 5, 2, 4),
                                                                      (1, 5, 2, 4))
    with ops.record_dispatch("attention") as only:
        ops.attention(q, k, v, ops.Arrow(2, 1))
        ops.linear(x, w_lin)
    assert [(r.op, r.path) for r in only] == [("attention", dispatch.XLA_ATTENTION_PATH)]
    assert "Arrow" in only[0].reason


def test_registered_attention_and_conv_kernels_run_for_their_op_only():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    calls = []

    def arrow_apply(q, k, v, mask, scale):
        calls.append(("attention", mask, scale))
        return jnp.zeros_like(q)

    def conv_apply(x, w, b, geometry):
        calls.append(("conv", geometry.kernel_size, x.shape))
        return jnp.zeros((x.shape[0], 4, w.shape[1]))

    dispatch.register_kernel(dispatch.Kernel("test-arrow", lambda q, k, m: isinstance(m, ops.Arrow), arrow_apply,
                                             op="attention"))
    dispatch.register_kernel(dispatch.Kernel("test-conv", lambda x, w, g: g.kernel_size == (3,), conv_apply, op="conv"))
    try:
        x = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
        w = quantize(jnp.asarray(rng.standard_normal((24, 4)), jnp.float32), get_format("int8"), axis=0)
        with ops.record_dispatch(dispatch.OPS) as records:
            assert not ops.attention(q, k, v, ops.Arrow(2, 1)).any()
            causal = ops.attention(q, k, v, ops.Causal())
            assert not ops.conv(x, w, kernel_size=3).any()
            ops.linear(x, quantize(jnp.ones((8, 4)), get_format("int8"), axis=0))
        assert [(r.op, r.path) for r in records] == [("attention", "test-arrow"),
                                                     ("attention", dispatch.XLA_ATTENTION_PATH),
                                                     ("conv", "test-conv"), ("linear", dispatch.XLA_PATH)]
        assert calls == [("attention", ops.Arrow(2, 1), 0.5), ("conv", (3,), (1, 6, 8))]
        assert np.abs(np.asarray(causal)).max() > 0
        assert ops.explain(q, k, op="attention", mask=ops.Arrow(2, 1)) == "test-arrow"
        with ops.force_path("xla"):
            assert ops.explain(q, k, op="attention", mask=ops.Arrow(2, 1)) == dispatch.XLA_ATTENTION_PATH
            assert np.abs(np.asarray(ops.conv(x, w, kernel_size=3))).max() > 0
    finally:
        dispatch.unregister_kernel("test-arrow")
        dispatch.unregister_kernel("test-conv")
    assert ops.explain(q, k, op="attention", mask=ops.Arrow(2, 1)) == dispatch.XLA_ATTENTION_PATH


def test_bad_ops_are_refused():
    with pytest.raises(ValueError, match=r"record_dispatch: unknown ops \['matmul'\]"):
        with ops.record_dispatch(("matmul",)):
            pass
    with pytest.raises(ValueError, match="op='matmul'; kernels can be registered for 'linear', 'conv' or 'attention'"):
        dispatch.Kernel("x", lambda *a: True, lambda *a: None, op="matmul")
    with pytest.raises(ValueError, match="explain: op='grouped_matmul'"):
        ops.explain(jnp.ones((2, 8)), jnp.ones((8, 4)), op="grouped_matmul")
