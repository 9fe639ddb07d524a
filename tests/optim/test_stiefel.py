"""Riemannian Adam / Cayley SGD on the Stiefel manifold, against float64 numpy references of geoopt's maths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jquant.optim import (ROTATION_LR, SCALE_LR, cayley_retract, cayley_sgd, ostquant_optimizer, project_tangent,
                          project_to_stiefel, riemannian_adam)


def _stiefel(rng, shape):
    """A random point [..., n, p] (Q factor of a Gaussian matrix), float64."""
    return np.linalg.qr(rng.normal(size=shape))[0]


def _brockett_problem(rng, shape):
    """Brockett cost f(X) = Σ_batch tr(Xᵀ A X N): A symmetric per batch entry, N = diag(1..p). Returns (A, N, f_min)."""
    a = rng.normal(size=shape[:-2] + (shape[-2], shape[-2]))
    a = a + np.swapaxes(a, -1, -2)
    p = shape[-1]
    # the minimum pairs the p smallest eigenvalues (ascending) with the weights p..1
    f_min = np.sum(np.sort(np.linalg.eigvalsh(a), axis=-1)[..., :p] * np.arange(p, 0, -1))
    return a, np.diag(np.arange(1.0, p + 1)), f_min


def _brockett(x, a, n):
    return jnp.sum(jnp.trace(jnp.swapaxes(x, -1, -2) @ a @ x @ n, axis1=-2, axis2=-1))


def _orthogonality_error(x):
    x = np.asarray(x, np.float64)
    return np.abs(np.swapaxes(x, -1, -2) @ x - np.eye(x.shape[-1])).max()


def _run(tx, x, loss, steps):
    """``steps`` jitted optimiser steps on ``loss``; returns the final parameters."""
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        updates, state = tx.update(jax.grad(loss)(x), state, x)
        return optax.apply_updates(x, updates), state

    for _ in range(steps):
        x, state = step(x, state)
    return x


def _reference_adam(x, grad_fn, steps, lr, second_moment, b1=0.9, b2=0.999, eps=1e-8, stabilize=10):
    """geoopt RiemannianAdam on the canonical Stiefel manifold, written out in float64 numpy."""
    t_ = lambda y: np.swapaxes(y, -1, -2)  # noqa: E731
    m = np.zeros_like(x)
    v = np.zeros(x.shape[:-2] + (1, 1)) if second_moment == "canonical" else np.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad_fn(x)
        r = g - x @ t_(g) @ x
        m = b1 * m + (1 - b1) * r
        xtr = t_(x) @ r
        s = ((r * r).sum((-2, -1), keepdims=True) - 0.5 * (xtr * xtr).sum((-2, -1), keepdims=True)
             if second_moment == "canonical" else r * r)
        v = b2 * v + (1 - b2) * s
        xi = -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        a = xi @ t_(x) - x @ t_(xi)
        eye = np.eye(x.shape[-2])
        cayley = np.linalg.inv(eye - a / 2) @ (eye + a / 2)
        x, m = cayley @ x, cayley @ m
        if t % stabilize == 0:
            u, _, vt = np.linalg.svd(x, full_matrices=False)
            x = u @ vt
            m = m - x @ t_(m) @ x
    return x


@pytest.mark.parametrize("shape", [(16, 16), (12, 5), (3, 8, 8)])
def test_riemannian_gradient_is_tangent(shape):
    rng = np.random.default_rng(0)
    x, g = _stiefel(rng, shape), rng.normal(size=shape)
    r = np.asarray(project_tangent(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)), np.float64)
    np.testing.assert_allclose(r, g - x @ np.swapaxes(g, -1, -2) @ x, rtol=1e-5, atol=1e-5)
    xtr = np.swapaxes(x, -1, -2) @ r
    assert np.abs(xtr + np.swapaxes(xtr, -1, -2)).max() < 1e-5


@pytest.mark.parametrize("shape", [(16, 16), (12, 5), (3, 8, 8)])
def test_cayley_retraction_matches_float64_and_stays_on_manifold(shape):
    rng = np.random.default_rng(1)
    x, xi, m = _stiefel(rng, shape), 0.3 * rng.normal(size=shape), rng.normal(size=shape)
    got_x, got_m = cayley_retract(*(jnp.asarray(y, jnp.float32) for y in (x, xi, m)))
    a = xi @ np.swapaxes(x, -1, -2) - x @ np.swapaxes(xi, -1, -2)
    eye = np.eye(shape[-2])
    cayley = np.linalg.inv(eye - a / 2) @ (eye + a / 2)
    np.testing.assert_allclose(np.asarray(got_x), cayley @ x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_m), cayley @ m, atol=1e-5)
    assert _orthogonality_error(got_x) < 1e-5


def test_project_to_stiefel_is_polar_factor():
    rng = np.random.default_rng(2)
    x = _stiefel(rng, (3, 7, 4)) + 1e-2 * rng.normal(size=(3, 7, 4))
    got = np.asarray(project_to_stiefel(jnp.asarray(x, jnp.float32)), np.float64)
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(got, u @ vt, atol=1e-5)
    assert _orthogonality_error(got) < 1e-5


@pytest.mark.parametrize("second_moment", ["canonical", "elementwise"])
@pytest.mark.parametrize("shape", [(6, 6), (7, 4), (2, 5, 5)])
def test_riemannian_adam_matches_float64_reference(shape, second_moment):
    # 12 steps cross one stabilisation (step 10); float64 end to end
    rng = np.random.default_rng(3)
    x0 = _stiefel(rng, shape)
    a, n, _ = _brockett_problem(rng, shape)
    ref = _reference_adam(x0, lambda x: 2 * a @ x @ n, steps=12, lr=0.05, second_moment=second_moment)
    jax.config.update("jax_enable_x64", True)
    try:
        got = np.asarray(_run(riemannian_adam(0.05, second_moment=second_moment), jnp.asarray(x0),
                              lambda x: _brockett(x, a, n), steps=12))
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_allclose(got, ref, atol=1e-10)


@pytest.mark.parametrize("shape", [(16, 16), (3, 8, 8), (12, 5)])
def test_riemannian_adam_decreases_brockett_and_keeps_orthogonality(shape):
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(_stiefel(rng, shape), jnp.float32)
    a, n, f_min = _brockett_problem(rng, shape)
    loss = lambda x: _brockett(x, jnp.asarray(a, jnp.float32), jnp.asarray(n, jnp.float32))  # noqa: E731
    x = _run(riemannian_adam(0.05), x0, loss, steps=50)
    assert _orthogonality_error(x) < 1e-5
    f0, f1 = float(loss(x0)), float(loss(x))
    assert f1 - f_min < 0.25 * (f0 - f_min)  # most of the gap to the optimum closed in 50 steps


def test_orthogonality_over_fifty_steps_at_ostquant_rate():
    # the spec's §5.2 check: ‖XᵀX − I‖_max < 1e-5 in fp32 after 50 steps, at the default rotation rate
    rng = np.random.default_rng(5)
    target = jnp.asarray(rng.normal(size=(4, 32, 32)), jnp.float32)
    x = _run(riemannian_adam(ROTATION_LR), jnp.asarray(_stiefel(rng, (4, 32, 32)), jnp.float32),
             lambda x: jnp.sum((x - target) ** 2), steps=50)
    assert _orthogonality_error(x) < 1e-5


def test_state_is_a_pytree_and_update_jits():
    rng = np.random.default_rng(6)
    params = {"r_res": jnp.asarray(_stiefel(rng, (8, 8)), jnp.float32),
              "r_ov": jnp.asarray(_stiefel(rng, (2, 4, 4)), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx = riemannian_adam(0.01)
    state = tx.init(params)
    leaves, treedef = jax.tree.flatten(state)
    assert state.nu["r_res"].shape == (1, 1) and state.nu["r_ov"].shape == (2, 1, 1)
    state = jax.tree.unflatten(treedef, leaves)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert int(new_state.count) == 1
    assert jax.tree.structure(new_state) == treedef
    for key in params:
        assert updates[key].dtype == params[key].dtype
        assert _orthogonality_error(params[key] + updates[key]) < 1e-5


def test_schedule_learning_rate():
    rng = np.random.default_rng(7)
    x = jnp.asarray(_stiefel(rng, (6, 6)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
    # the schedule is read at the 0-based count: rate 0 on the first step leaves the point exactly unchanged
    tx = riemannian_adam(optax.linear_schedule(0.0, 0.1, 10))
    updates, _ = jax.jit(tx.update)(g, tx.init(x), x)
    assert np.all(np.asarray(updates) == 0)
    # a constant schedule gives exactly what the float gives
    fixed, scheduled = riemannian_adam(0.02), riemannian_adam(optax.constant_schedule(0.02))
    want, _ = jax.jit(fixed.update)(g, fixed.init(x), x)
    got, _ = jax.jit(scheduled.update)(g, scheduled.init(x), x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rejects_bad_shapes_and_missing_params():
    tx = riemannian_adam(0.01)
    with pytest.raises(ValueError, match="p <= n"):
        tx.init({"wide": jnp.zeros((3, 5))})
    with pytest.raises(ValueError, match="p <= n"):
        cayley_sgd(0.01).init(jnp.zeros((4,)))
    x = jnp.eye(3)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(x, tx.init(x))
    with pytest.raises(ValueError, match="second_moment"):
        riemannian_adam(0.01, second_moment="diag")


def test_cayley_sgd_step_and_descent():
    rng = np.random.default_rng(8)
    x0 = _stiefel(rng, (10, 4))
    a, n, f_min = _brockett_problem(rng, (10, 4))
    g = 2 * a @ x0 @ n
    # one momentum-free step is the Cayley retraction along −lr·r (float64 reference)
    tx = cayley_sgd(0.01)
    x0_32 = jnp.asarray(x0, jnp.float32)
    updates, _ = jax.jit(tx.update)(jnp.asarray(g, jnp.float32), tx.init(x0_32), x0_32)
    xi = -0.01 * (g - x0 @ g.T @ x0)
    a_mat = xi @ x0.T - x0 @ xi.T
    want = np.linalg.solve(np.eye(10) - a_mat / 2, (np.eye(10) + a_mat / 2) @ x0)
    np.testing.assert_allclose(np.asarray(x0 + updates), want, atol=1e-5)
    loss = lambda x: _brockett(x, jnp.asarray(a, jnp.float32), jnp.asarray(n, jnp.float32))  # noqa: E731
    x = _run(cayley_sgd(0.01, momentum=0.9), x0_32, loss, steps=50)
    assert _orthogonality_error(x) < 1e-5
    assert float(loss(x)) - f_min < 0.25 * (float(loss(x0_32)) - f_min)


def test_ostquant_optimizer_routes_rotations_and_scales():
    rng = np.random.default_rng(9)
    params = {"r_res": jnp.asarray(_stiefel(rng, (8, 8)), jnp.float32),
              "r_ov": jnp.asarray(_stiefel(rng, (2, 4, 4)), jnp.float32),
              "s_attn": jnp.asarray(np.exp(0.3 * rng.normal(size=8)), jnp.float32)}
    total = 20
    tx = ostquant_optimizer(total)
    rotation = riemannian_adam(optax.cosine_decay_schedule(ROTATION_LR, total))
    scale = optax.adam(optax.cosine_decay_schedule(SCALE_LR, total))
    rotations = {k: params[k] for k in ("r_res", "r_ov")}
    state, rot_state, scale_state = tx.init(params), rotation.init(rotations), scale.init(params["s_attn"])
    update, rot_update, scale_update = jax.jit(tx.update), jax.jit(rotation.update), jax.jit(scale.update)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = update(grads, state, params)
        want_rot, rot_state = rot_update({k: grads[k] for k in rotations}, rot_state, rotations)
        want_scale, scale_state = scale_update(grads["s_attn"], scale_state)
        np.testing.assert_allclose(updates["s_attn"], want_scale, rtol=1e-6, atol=1e-9)
        for k in rotations:
            np.testing.assert_allclose(updates[k], want_rot[k], rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates)
        rotations = {k: params[k] for k in rotations}
    assert _orthogonality_error(params["r_res"]) < 1e-5 and _orthogonality_error(params["r_ov"]) < 1e-5


def test_ostquant_optimizer_custom_labels():
    # a 2-D scale can be labelled a scale explicitly; it then gets plain Adam (no retraction)
    params = {"rot": jnp.eye(4), "wide_scale": jnp.ones((1, 4))}
    tx = ostquant_optimizer(10, labels={"rot": "rotation", "wide_scale": "scale"})
    grads = {"rot": jnp.ones((4, 4)), "wide_scale": jnp.ones((1, 4))}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["wide_scale"], -SCALE_LR * np.ones((1, 4)), rtol=1e-5)
    with pytest.raises(ValueError, match="total_steps"):
        ostquant_optimizer(0)


def test_works_with_nnx_optimizer():
    class Transforms(nnx.Module):
        def __init__(self, rng):
            self.r_res = nnx.Param(jnp.asarray(_stiefel(rng, (8, 8)), jnp.float32))
            self.r_ov = nnx.Param(jnp.asarray(_stiefel(rng, (2, 4, 4)), jnp.float32))
            self.s_ffn = nnx.Param(jnp.ones(8))

    def loss(m):
        return jnp.sum(m.r_res[...] @ jnp.arange(8.0)) + jnp.sum(m.r_ov[...] ** 3) + jnp.sum((m.s_ffn[...] - 2) ** 2)

    model = Transforms(np.random.default_rng(10))
    optimizer = nnx.Optimizer(model, ostquant_optimizer(10), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    before = float(loss(model))
    for _ in range(12):  # crosses one stabilisation
        step(model, optimizer)
    assert float(loss(model)) < before
    assert _orthogonality_error(model.r_res[...]) < 1e-5 and _orthogonality_error(model.r_ov[...]) < 1e-5
