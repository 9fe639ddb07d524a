"""GPTQ compiles a fixed set of programs per weight shape and format, and nothing for a second site or call.

The set: the sweep (on fixed-width column chunks, with the format's encode), one per input size and shared by the
shapes that have it. Where the arrays live on an accelerator (the ``path`` fixture's ``device``, forced here on the
CPU) also the damped factor (with the act-order permutation), one per input size, and per solve (a site's weight, or
the sites ``quantize`` solves together: in the Llama test q/k/v, o, gate/up and down, as many solves as distinct site
shapes) the cut into column chunks and the split of the results back into sites; on the CPU (``host``) numpy and
LAPACK do those without compiling. Eager array operations would each compile a program per new shape, and anything
passed as a static argument that changes per call would recompile per site: both show up here as extra compilations.
"""

import dataclasses
import logging
import re

import jax
import numpy as np
import pytest

from jquant.algorithms import gptq_core
from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import dequantize, get_format
from jquant.models import llama
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites

PER_INPUT_SIZE = {"host": ["gptq_sweep"], "device": ["_hessian_factor_once", "gptq_sweep"]}
PER_SHAPE = {"host": [], "device": ["_out_chunks", "_split_out_chunks"]}
GPTQ_PROGRAMS = PER_INPUT_SIZE["device"] + PER_SHAPE["device"]


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch):
    """Run the test with ``gptq_columns``' host path (the CPU default) or its device path (XLA programs)."""
    monkeypatch.setattr(gptq_core, "_on_host", lambda *arrays: request.param == "host")
    return request.param


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
def test_new_shape_compiles_the_fixed_set_and_a_second_site_nothing(caplog, act_order, path):
    fmt = get_format("int4-g32-full", scale_dtype="float32")
    options = {"act_order": act_order, "block_size": 32}
    # an input size no other test uses, so the first call compiles here
    n_in, n_out = 224 + 32 * (path == "device"), 40 + 8 * act_order
    (w1, s1), (w2, s2) = _site(1, n_in, n_out), _site(2, n_in, n_out)
    q1, first = _compiled(caplog, lambda: gptq_weight(w1, fmt, axis=0, stats=s1, options=options))
    assert sorted(first) == sorted(PER_INPUT_SIZE[path] + PER_SHAPE[path]), first
    q2, second = _compiled(caplog, lambda: gptq_weight(w2, fmt, axis=0, stats=s2, options=options))
    assert second == []
    # the cached programs really ran on the second site's arrays: they give other values, and the same ones again
    assert not np.array_equal(np.asarray(dequantize(q1)), np.asarray(dequantize(q2)))
    assert np.array_equal(np.asarray(gptq_weight(w2, fmt, axis=0, stats=s2, options=options).codes),
                          np.asarray(q2.codes))


def test_quantize_compiles_gptq_once_per_shape_and_a_second_call_no_gptq_or_block_program(caplog, path):
    hidden, mlp = (208, 240) if path == "host" else (176, 272)  # input sizes no other test uses
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=mlp, num_layers=2, num_heads=4,
                            num_kv_heads=2)
    model = llama.init_model(cfg, jax.random.key(0))
    shapes = {s.weight.get_value().shape for s in find_sites(model) if s.path.startswith("layers/")}
    calib = np.random.default_rng(0).integers(0, 64, size=(4, 16), dtype=np.int32)
    rule = Rule(pattern=r".*", weight="int4-g16-asym", algorithm="gptq", options={"act_order": True})
    recipe = Recipe(name="compile-count", description="int4 g16 GPTQ, act-order", rules=(rule,))
    _, first = _compiled(caplog, lambda: quantize(model, recipe, calib, progress=False))
    gptq_programs = [n for n in first if n in GPTQ_PROGRAMS]
    input_sizes = {shape[0] for shape in shapes}
    assert len(input_sizes) < len(shapes)  # so the test sees the factor shared between shapes
    expected = PER_INPUT_SIZE[path] * len(input_sizes) + PER_SHAPE[path] * len(shapes)
    assert sorted(gptq_programs) == sorted(expected), gptq_programs
    _, second = _compiled(caplog, lambda: quantize(model, recipe, calib, progress=False))
    assert [n for n in second if n in GPTQ_PROGRAMS or n == "_forward"] == [], second


def test_shared_input_solve_equals_each_site_on_its_own(path):
    """q/k/v-like weights of one input size with one Hessian: one shared solve gives every site's own QArray."""
    from jquant.algorithms.weights import gptq_shared_input

    fmt = get_format("int4-g32-asym")
    (w1, stats), (w2, _), (w3, _) = _site(3, 64, 48), _site(4, 64, 16), _site(5, 64, 16)
    options = {"act_order": True, "block_size": 32}
    shared = gptq_shared_input([w1, w2, w3], fmt, axis=0, stats=stats, options=options)
    for w, q in zip([w1, w2, w3], shared, strict=True):
        alone = gptq_weight(w, fmt, axis=0, stats=stats, options=options)
        assert q.shape == alone.shape and q.dtype == alone.dtype
        for a, b in [(q.codes, alone.codes), (q.scales, alone.scales), (q.zeros, alone.zeros)]:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="one input size"):
        gptq_shared_input([w1, _site(6, 32, 16)[0]], fmt, axis=0, stats=stats, options=options)


def test_quantize_solves_sites_with_one_input_together(monkeypatch):
    """In a Llama block q/k/v share one solve and gate/up another; o and down are solved alone."""
    from jquant import quantization
    from jquant.algorithms import weights as weight_algorithms

    solved: list[list[tuple[int, int]]] = []
    spec = weight_algorithms.algorithm("gptq")
    shared, alone = spec.quantize_shared, spec.quantize

    def record_shared(weights, *a, **kw):
        solved.append([tuple(w.shape) for w in weights])
        return shared(weights, *a, **kw)

    def record_alone(weight, *a, **kw):
        solved.append([tuple(weight.shape)])
        return alone(weight, *a, **kw)

    recording = dataclasses.replace(spec, quantize=record_alone, quantize_shared=record_shared)
    monkeypatch.setattr(quantization, "algorithm", lambda name: recording if name == "gptq" else spec)
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                            num_kv_heads=2)
    model = llama.init_model(cfg, jax.random.key(0))
    calib = np.random.default_rng(0).integers(0, 64, size=(2, 8), dtype=np.int32)
    quantize(model, Recipe(name="g", description="gptq", rules=(Rule(pattern=r".*", weight="int4-g16-asym",
                                                                         algorithm="gptq"),)), calib, progress=False)
    assert sorted(sorted(call) for call in solved) == [[(32, 16), (32, 16), (32, 32)], [(32, 32)],
                                                       [(32, 64), (32, 64)], [(64, 32)]]
