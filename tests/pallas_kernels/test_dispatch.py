"""Dispatch between the XLA path, Pallas kernels and XLA's native low-precision dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.benchmark_report import dispatch_table, markdown_report
from jquant.formats import get_format, quantize
from jquant.models import llama
from jquant.ops import dispatch
from jquant.pallas_kernels import registry


def _w(fmt="int4-g64", k=256, n=128, seed=0):
    return quantize(jax.random.normal(jax.random.PRNGKey(seed), (k, n)), fmt, axis=0)


def test_auto_mode_uses_xla_off_gpu_and_records_why():
    x = jnp.ones((3, 256))
    with jq.ops.record_dispatch() as rec:
        jq.ops.linear(x, _w())
    assert rec[0].path == dispatch.XLA_PATH and "kernels run on GPUs only" in rec[0].reason


@pytest.mark.parametrize("fmt, act", [("int4-g64", None), ("nvfp4", None), ("int8", "int8"), ("fp8-e4m3", "fp8-e4m3")])
def test_forced_pallas_matches_xla_path_on_batched_input(fmt, act):
    activation = None if act is None else get_format(act)
    w, b = _w(fmt, seed=1), jax.random.normal(jax.random.PRNGKey(2), (128,))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 256))
    with jq.ops.force_path("xla"):
        ref = jq.ops.linear(x, w, b, activation=activation)
    with jq.ops.force_path("pallas"), jq.ops.record_dispatch() as rec:
        got = jq.ops.linear(x, w, b, activation=activation)
    assert rec[0].path.startswith("pallas-"), rec[0].reason
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_shapes_that_do_not_tile_fall_back_and_stay_correct():
    w = _w("int4-g32", k=96, n=100)
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 96))
    with jq.ops.force_path("pallas"), jq.ops.record_dispatch() as rec:
        got = jq.ops.linear(x, w)
    assert rec[0].path == dispatch.XLA_PATH and "does not apply" in rec[0].reason
    with jq.ops.force_path("xla"):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jq.ops.linear(x, w)))


def test_static_activation_scales_stay_on_xla():
    with jq.ops.force_path("pallas"):
        assert jq.ops.explain(jnp.ones((2, 256)), _w("int8"), get_format("int8"),
                              activation_scale=jnp.float32(0.1)) == dispatch.XLA_PATH


def test_mode_from_environment_and_bad_modes(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "pallas")
    assert dispatch.current_mode() == "pallas"
    assert jq.ops.explain(jnp.ones((2, 256)), _w()) == "pallas-weight-only-int"
    monkeypatch.setenv(dispatch.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="JQUANT_KERNELS.*'fast'"):
        dispatch.current_mode()
    with pytest.raises(ValueError, match="force_path: unknown kernel mode 'cuda'"):
        with jq.ops.force_path("cuda"):
            pass


def _table(paths, ms=(1, 16, 1024), shape="4096x4096", case="w4a16-int4-g128"):
    cfg = registry.candidate_configs("pallas-weight-only-int", 1)[0].as_dict()
    return {"cases": {case: {shape: {"m": list(ms), "path": list(paths), "config": [cfg] * len(ms)}}}}


def test_decide_follows_the_measured_table():
    w = _w("int4-g128", k=512, n=512)
    table = _table(["pallas", "pallas", "xla"])
    assert registry.decide(w, None, 1, 4096, 4096, table).kernel == "pallas-weight-only-int"
    assert registry.decide(w, None, 8, 4096, 4096, table).kernel == "pallas-weight-only-int"
    assert registry.decide(w, None, 2048, 4096, 4096, table).kernel is None
    assert registry.decide(w, None, 2048, 8192, 8192, table).kernel is None  # nearest measured shape
    no_case = registry.decide(w, None, 1, 4096, 4096, {"cases": {}})
    assert no_case.kernel is None and "no GPU measurement" in no_case.reason
    native = _table(["native"] * 3, case="w8a8-int8")
    d = registry.decide(_w("int8"), get_format("int8"), 1, 4096, 4096, native)
    assert d.kernel == registry.NATIVE


def test_dispatch_table_picks_the_fastest_path_per_m():
    rows = []
    for m, times in ((1, {"bf16": 3.0, "xla": 4.0, "pallas": 1.0}), (1024, {"bf16": 3.0, "xla": 2.0, "pallas": 5.0})):
        for path, t in times.items():
            rows.append(dict(case="bf16" if path == "bf16" else "w8a16-int8", path=path, k=64, n=64, m=m,
                             seconds=t, roofline_fraction=0.5, tb_per_s=1.0, tflop_per_s=1.0, vs_bf16=3.0 / t,
                             config={"block_m": 16} if path == "pallas" else None))
    result = {"device": "test", "jax": jax.__version__, "rows": rows,
              "ceilings": {"hbm_bytes_per_s": 1e12, "bf16_flops_per_s": 1e15}}
    assert dispatch_table(result)["cases"]["w8a16-int8"]["64x64"]["path"] == ["pallas", "xla"]
    assert "| w8a16-int8 | 64x64 | 3.00 | 0.60 |" in markdown_report(result)


def test_quantized_model_logits_identical_through_kernels():
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                            num_heads=4, num_kv_heads=4)
    model = jq.quantize(llama.init_model(cfg, jax.random.PRNGKey(5)), jq.recipes.get("rtn-w4g64"))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 9), 0, 64)
    with jq.ops.force_path("xla"):
        ref = model(tokens)
    with jq.ops.force_path("pallas"), jq.ops.record_dispatch() as rec:
        got = model(tokens)
    assert {r.path for r in rec} == {"pallas-weight-only-int"} and len(rec) == 7
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_table_merge_keeps_unmeasured_m_and_decide_refuses_far_larger_m():
    from jquant.benchmark_report import merge_tables

    old = _table(["pallas", "pallas", "xla"])
    new = {"cases": {"w4a16-int4-g128": {"4096x4096": {"m": [1, 4], "path": ["xla", "pallas"],
                                                       "kernel": [None, "pallas-int-gemv"],
                                                       "config": [None, old["cases"]["w4a16-int4-g128"]["4096x4096"]["config"][0]]}},
                     "w8a16-int8": {"64x64": {"m": [1], "path": ["pallas"], "kernel": [None], "config": [{}]}}}}
    merged = merge_tables(old, new)
    entry = merged["cases"]["w4a16-int4-g128"]["4096x4096"]
    assert entry["m"] == [1, 4, 16, 1024] and entry["path"] == ["xla", "pallas", "pallas", "xla"]
    assert entry["kernel"][1] == "pallas-int-gemv" and entry["kernel"][2] is None
    w = _w("int4-g128", k=512, n=512)
    assert registry.decide(w, None, 4, 4096, 4096, merged).kernel == "pallas-int-gemv"
    short = {"cases": {"w4a16-int4-g128": {"4096x4096": {"m": [1, 16], "path": ["pallas"] * 2, "config": [
        registry.default_config("pallas-weight-only-int", 1).as_dict()] * 2}}}}
    assert registry.decide(w, None, 32, 4096, 4096, short).kernel == "pallas-weight-only-int"
    far = registry.decide(w, None, 64, 4096, 4096, short)
    assert far.kernel is None and "not measured at or near M=64" in far.reason
