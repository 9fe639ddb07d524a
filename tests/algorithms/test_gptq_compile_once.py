"""GPTQ compiles a fixed set of programs per weight shape and format, and nothing for a second site or call.

The set (``GPTQ_PROGRAMS``): the damped factor (with the act-order permutation; one per input size, shared by the
shapes that have it), the sweep, and the format's encode of the result. Eager array operations would each compile a program per new shape, and anything passed as a static
argument that changes per call would recompile per site: both show up here as extra compilations.
"""

import logging
import re

import jax
import numpy as np
import pytest

from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import dequantize, get_format
from jquant.models import llama
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites

FACTOR = "_hessian_factor_once"
GPTQ_PROGRAMS = [FACTOR, "gptq_sweep", "gptq_encode"]


def _site(seed: int, n_in: int, n_out: int) -> tuple[jax.Array, InputStatistics]:
    """A random weight ``[in, out]`` (on device) and the float64 statistics of random correlated inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * n_in, n_in)) @ rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    w = jax.device_put(rng.normal(size=(n_in, n_out)).astype(np.float32))
    return w, InputStatistics(hessian=x.T @ x, count=float(len(x)), absmax=np.abs(x).max(0))


def _compiled(caplog, fn):
    """``fn()`` (waited for) and the names of the XLA programs it compiled (jax's log_compiles messages)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
        out = jax.block_until_ready(fn())
    names = [re.search(r"Compiling jit\((.*?)\)", r.getMessage()) for r in caplog.records]
    return out, [m.group(1) for m in names if m]


@pytest.mark.parametrize("act_order", [False, True])
def test_new_shape_compiles_the_fixed_set_and_a_second_site_nothing(caplog, act_order):
    fmt = get_format("int4-g32-full", scale_dtype="float32")
    options = {"act_order": act_order, "block_size": 32}
    n_in, n_out = 96, 40 + 8 * act_order  # shapes no other test uses, so the first call compiles here
    (w1, s1), (w2, s2) = _site(1, n_in, n_out), _site(2, n_in, n_out)
    q1, first = _compiled(caplog, lambda: gptq_weight(w1, fmt, axis=0, stats=s1, options=options))
    assert sorted(first) == sorted(GPTQ_PROGRAMS), first
    q2, second = _compiled(caplog, lambda: gptq_weight(w2, fmt, axis=0, stats=s2, options=options))
    assert second == []
    # the cached programs really ran on the second site's arrays: they give other values, and the same ones again
    assert not np.array_equal(np.asarray(dequantize(q1)), np.asarray(dequantize(q2)))
    assert np.array_equal(np.asarray(gptq_weight(w2, fmt, axis=0, stats=s2, options=options).codes),
                          np.asarray(q2.codes))


def test_quantize_compiles_gptq_once_per_shape_and_a_second_call_no_gptq_or_block_program(caplog):
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                            num_kv_heads=2)  # a config no other test uses
    model = llama.init_model(cfg, jax.random.key(0))
    shapes = {s.weight.get_value().shape for s in find_sites(model) if s.path.startswith("layers/")}
    calib = np.random.default_rng(0).integers(0, 64, size=(4, 16), dtype=np.int32)
    rule = Rule(pattern=r".*", weight="int4-g16-asym", algorithm="gptq", options={"act_order": True})
    recipe = Recipe(name="compile-count", description="int4 g16 GPTQ, act-order", rules=(rule,))
    _, first = _compiled(caplog, lambda: quantize(model, recipe, calib, progress=False))
    gptq_programs = [n for n in first if n in GPTQ_PROGRAMS]
    input_sizes = {shape[0] for shape in shapes}
    assert len(input_sizes) < len(shapes)  # so the test sees the factor shared between shapes
    expected = [FACTOR] * len(input_sizes) + ["gptq_sweep", "gptq_encode"] * len(shapes)
    assert sorted(gptq_programs) == sorted(expected), gptq_programs
    _, second = _compiled(caplog, lambda: quantize(model, recipe, calib, progress=False))
    assert [n for n in second if n in GPTQ_PROGRAMS or n == "_forward"] == [], second
