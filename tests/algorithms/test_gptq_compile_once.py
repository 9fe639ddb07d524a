"""GPTQ compiles once per weight shape and format: a second site of the same shape compiles nothing."""

import logging

import jax
import numpy as np
import pytest

from jquant.algorithms.gptq_core import gptq_sweep
from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import dequantize, get_format


def _site(seed: int, n_in: int, n_out: int) -> tuple[jax.Array, InputStatistics]:
    """A random weight ``[in, out]`` and the statistics of random correlated inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * n_in, n_in)) @ rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    w = jax.numpy.asarray(rng.normal(size=(n_in, n_out)).astype(np.float32))
    return w, InputStatistics(hessian=x.T @ x, count=float(len(x)), absmax=np.abs(x).max(0))


def _quantize_logging_compiles(caplog, w, fmt, stats, options):
    """``gptq_weight(w, ...)`` and the XLA compilations it triggered (jax's log_compiles messages)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
        q = jax.block_until_ready(gptq_weight(w, fmt, axis=0, stats=stats, options=options))
    return q, [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


@pytest.mark.parametrize("act_order", [False, True])
def test_second_site_of_the_same_shape_compiles_nothing(caplog, act_order):
    fmt = get_format("int4-g32-full", scale_dtype="float32")
    options = {"act_order": act_order, "block_size": 32}
    n_in, n_out = 96, 40 + 8 * act_order  # shapes no other test uses, so the first call compiles here
    (w1, s1), (w2, s2) = _site(1, n_in, n_out), _site(2, n_in, n_out)
    loops = gptq_sweep._cache_size()
    q1, first = _quantize_logging_compiles(caplog, w1, fmt, s1, options)
    assert first and gptq_sweep._cache_size() == loops + 1
    q2, second = _quantize_logging_compiles(caplog, w2, fmt, s2, options)
    assert second == [] and gptq_sweep._cache_size() == loops + 1
    # the cached program really ran on the second site's arrays: they give other values, and the same ones again
    assert not np.array_equal(np.asarray(dequantize(q1)), np.asarray(dequantize(q2)))
    assert np.array_equal(np.asarray(gptq_weight(w2, fmt, axis=0, stats=s2, options=options).codes),
                          np.asarray(q2.codes))
