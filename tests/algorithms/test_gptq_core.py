"""GPTQ against a float64 numpy implementation of the GPTQ update, and the method's defining claim.

``gptq_columns`` factors the Hessian and cuts and splits the columns on the host (numpy, LAPACK) where the arrays
live on the CPU and in XLA programs elsewhere: the ``path`` fixture runs a test on both (the device path forced on the
CPU), and the two factors are compared directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms import gptq_core
from jquant.algorithms.gptq_core import GPTQConfig, gptq

BITS = 3
QMAX = 2**BITS - 1


# ---- an asymmetric min-max integer grid, in numpy (reference) and jnp (under test) --------------
def np_params(rows):
    hi, lo = np.maximum(rows.max(0), 0), np.minimum(rows.min(0), 0)
    s = np.where(hi > lo, (hi - lo) / QMAX, 1.0)
    return s, np.round(-lo / s)


def np_qdq(row, s, z):
    return (np.clip(np.round(row / s) + z, 0, QMAX) - z) * s


def jnp_params(rows):
    hi, lo = jnp.maximum(rows.max(0), 0), jnp.minimum(rows.min(0), 0)
    s = jnp.where(hi > lo, (hi - lo) / QMAX, 1.0)
    return s[None], jnp.round(-lo / s)[None]


def jnp_qdq(row, s, z):
    return (jnp.clip(jnp.round(row / s) + z, 0, QMAX) - z) * s


def reference_gptq(w, h, group_size, damp, act_order=False, static_groups=False):
    """Row-at-a-time GPTQ in float64: quantize row i, push its error onto all later rows (no lazy batching)."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n_in = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(n_in)
    gs = group_size or n_in
    static = static_groups or act_order or group_size is None
    if static:
        params = [np_params(w[g * gs:(g + 1) * gs]) for g in range(n_in // gs)]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
    w, h = w[perm], h[perm][:, perm]
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i in range(n_in):
        if static:
            s, z = params[perm[i] // gs]
        elif i % gs == 0:
            s, z = np_params(w[i:i + gs])
        q[i] = np_qdq(w[i], s, z)
        err = (w[i] - q[i]) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return q[np.argsort(perm)]


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch):
    """Run the test with ``gptq_columns``' host path (the CPU default) or its device path (XLA programs)."""
    monkeypatch.setattr(gptq_core, "_on_host", lambda *arrays: request.param == "host")
    return request.param


def _problem(seed, n_in=64, n_out=24, n_tokens=200):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_tokens, n_in)) * rng.uniform(0.2, 3.0, size=n_in)  # uneven input scales
    x[:, 5] = 0.0  # a dead input feature
    return rng.normal(size=(n_in, n_out)), x.T @ x, x


@pytest.mark.parametrize("group_size, act_order, static_groups, block_size",
                         [(None, False, False, 16), (16, False, False, 32), (16, False, True, 16), (8, True, False, 16),
                          (None, True, False, 128)])
def test_matches_float64_reference(group_size, act_order, static_groups, block_size, path):
    w, h, _ = _problem(seed=group_size or 0)
    jax.config.update("jax_enable_x64", True)
    try:
        got = gptq(w, h, jnp_params, jnp_qdq, group_size=group_size,
                   config=GPTQConfig(block_size=block_size, damp=0.01, act_order=act_order, static_groups=static_groups))
        weights = np.asarray(got.weights)
    finally:
        jax.config.update("jax_enable_x64", False)
    ref = reference_gptq(w, h, group_size, 0.01, act_order, static_groups)
    np.testing.assert_allclose(weights, ref, rtol=1e-9, atol=1e-9)
    assert np.all(weights[5] == 0)  # dead input row


def test_beats_rtn_on_output_error_but_not_on_weight_error():
    # correlated inputs, as real activations are: 24 latent factors mixed into 96 features, plus noise
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 96)) + 0.1 * rng.normal(size=(400, 96))
    x[:, 5] = 0.0
    w, h = rng.normal(size=(96, 48)), x.T @ x
    got = np.asarray(gptq(w.astype(np.float32), h.astype(np.float32), jnp_params, jnp_qdq, group_size=32).weights)
    s_z = [np_params(w[g * 32:(g + 1) * 32]) for g in range(3)]
    rtn = np.concatenate([np_qdq(w[g * 32:(g + 1) * 32], *s_z[g]) for g in range(3)])
    rtn[5] = 0  # same dead-row treatment
    out_err = lambda q: np.sum((x @ (w - q)) ** 2)  # noqa: E731
    assert out_err(got) < 0.7 * out_err(rtn)
    assert np.sum((w - got) ** 2) > np.sum((w - rtn) ** 2)


def test_indefinite_hessian_raises_damping_then_gives_up(path):
    w, h, _ = _problem(seed=3)
    bad = -np.eye(64)
    with pytest.raises(FloatingPointError, match="not positive definite"):
        gptq(w, bad, jnp_params, jnp_qdq, group_size=None, config=GPTQConfig(damp=0.0), max_damp_retries=1)
    barely = h - 1.001 * np.linalg.eigvalsh(h).min() * 0 - np.eye(64) * 1e-3 * np.mean(np.diag(h))
    result = gptq(w, barely, jnp_params, jnp_qdq, group_size=None, config=GPTQConfig(damp=0.0))
    assert result.damp > 0 and np.all(np.isfinite(np.asarray(result.weights)))


def test_group_size_must_divide():
    w, h, _ = _problem(seed=1)
    with pytest.raises(ValueError, match="group_size=48 does not divide the input size 64"):
        gptq(w, h, jnp_params, jnp_qdq, group_size=48)


@pytest.mark.parametrize("n_out, chunk", [(40, 16), (48, 16), (10, 16)])
@pytest.mark.parametrize("act_order, group_size", [(False, 8), (True, 8), (False, None)])
def test_column_chunks_equal_the_whole_width_sweep(n_out, chunk, act_order, group_size, path):
    """Output columns are independent given H: the sweep on chunks of ``chunk`` columns (the last zero-padded, or a
    narrow weight padded up to one chunk) gives the whole-width sweep's weights, scales and zeros bit for bit."""
    rng = np.random.default_rng()
    n_in = 32
    x = rng.standard_normal((4 * n_in, n_in)) @ rng.standard_normal((n_in, n_in))
    h = jnp.asarray(x.T @ x, jnp.float32)
    w = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
    config = GPTQConfig(block_size=16, act_order=act_order)
    whole = gptq(w, h, jnp_params, jnp_qdq, group_size=group_size, config=config, out_chunk=n_out)
    chunked = gptq(w, h, jnp_params, jnp_qdq, group_size=group_size, config=config, out_chunk=chunk)
    for a, b in [(whole.weights, chunked.weights), (whole.scales, chunked.scales), (whole.zeros, chunked.zeros)]:
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(chunked.weights), np.asarray(w))  # the weights were quantized


@pytest.mark.parametrize("act_order", [False, True])
def test_host_factor_equals_the_xla_factor(act_order):
    """LAPACK's factor (``_hessian_factor_host``) and the XLA program (``_hessian_factor_once``) on a random Hessian
    with a dead input and tied diagonal entries: the same permutation and dead inputs, ``U`` to float32 rounding,
    ``U^T U`` the damped inverse Hessian (float64 numpy), and both report a Hessian that is not positive definite."""
    rng = np.random.default_rng()
    x = rng.standard_normal((300, 48)) * rng.uniform(0.2, 3.0, 48)
    x[:, 7] = 0.0
    x[:, 9] = x[:, 11]  # equal diagonal entries: the stable order keeps 9 before 11
    h = (x.T @ x).astype(np.float32)
    u_host, perm_host, dead_host, finite_host = gptq_core._hessian_factor_host(h, 0.01, act_order=act_order)
    u_xla, perm_xla, dead_xla, finite_xla = gptq_core._hessian_factor_once(jnp.asarray(h), 0.01, act_order=act_order)
    assert finite_host and bool(finite_xla)
    np.testing.assert_array_equal(dead_host, np.asarray(dead_xla))
    assert dead_host[7] and dead_host.sum() == 1
    if act_order:
        np.testing.assert_array_equal(perm_host, np.asarray(perm_xla))
    else:
        assert perm_host is None and perm_xla is None
    np.testing.assert_allclose(u_host, np.asarray(u_xla), rtol=2e-4, atol=2e-4 * np.abs(u_host).max())
    order = perm_host if act_order else np.arange(48)
    damped = h.astype(np.float64)[order][:, order]
    damped[np.diag(damped) == 0, np.diag(damped) == 0] = 1.0
    damped += 0.01 * np.mean(np.diag(damped)) * np.eye(48)
    np.testing.assert_allclose(u_host.astype(np.float64).T @ u_host, np.linalg.inv(damped), rtol=1e-3,
                               atol=1e-4 * np.abs(np.linalg.inv(damped)).max())
    assert np.allclose(np.triu(u_host), u_host)
    indefinite = -np.eye(8, dtype=np.float32)
    assert not gptq_core._hessian_factor_host(indefinite, 0.0, act_order=act_order)[3]
    assert not bool(gptq_core._hessian_factor_once(jnp.asarray(indefinite), 0.0, act_order=act_order)[3])
