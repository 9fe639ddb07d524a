"""quantize(model, recipe, calib): purity, simulated == packed inference, GPTQ > RTN, validation errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.data import load_split, token_windows
from jquant.eval import perplexity
from jquant.eval.size import size_report
from jquant.formats import QArray, dequantize
from jquant.models import DEFAULT_MODEL, llama, load
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule, get

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).integers(0, 64, size=(8, 16)).astype(np.int32)


def _params(m):
    return jax.tree.leaves(nnx.state(m, nnx.Param))


def test_input_model_is_untouched(model, calib):
    before = [np.asarray(x) for x in _params(model)]
    qmodel = quantize(model, get("gptq-w4g128", weight="int4-g64-asym"), calib, progress=False)
    after = [np.asarray(x) for x in _params(model)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert isinstance(qmodel.layers[0].self_attn.q_proj.kernel.get_value(), QArray)
    assert not isinstance(model.layers[0].self_attn.q_proj.kernel.get_value(), QArray)
    assert qmodel.quantization.unquantized == ("embed_tokens", "lm_head")


@pytest.mark.parametrize("recipe", ["rtn-w8a8", "fp8-w8a8", "nvfp4-w4a16", "mxfp4-w4a16"])
def test_packed_inference_equals_fake_quant_simulation(model, recipe):
    qmodel = quantize(model, recipe, progress=False)
    simulated = nnx.clone(qmodel)
    for path, var in nnx.to_flat_state(nnx.state(simulated, nnx.Param)):
        if isinstance(var.get_value(), QArray):
            var.set_value(dequantize(var.get_value(), np.float32))  # float weights holding the dequantized values
    tokens = np.random.default_rng(1).integers(0, 64, size=(2, 12))
    np.testing.assert_array_equal(np.asarray(qmodel(tokens)), np.asarray(simulated(tokens)))


def test_gptq_beats_rtn_on_the_trained_default_model():
    loaded = load(DEFAULT_MODEL)
    val = token_windows(load_split("validation"), loaded.tokenizer, 128, max_windows=8)
    calib = token_windows(load_split("train"), loaded.tokenizer, 128, max_windows=16)
    ppl = {}
    for algorithm in ("rtn", "gptq"):
        recipe = Recipe(name=algorithm, rules=(Rule(pattern=".*", weight="int3-g64-asym", algorithm=algorithm),))
        qmodel = quantize(loaded.model, recipe, calib, progress=False)
        ppl[algorithm] = perplexity(qmodel, val, progress=False).ppl
    fp = perplexity(loaded.model, val, progress=False).ppl
    assert fp < ppl["gptq"] < ppl["rtn"], (fp, ppl)


def test_size_report_counts_stored_bits(model):
    qmodel = quantize(model, get("rtn-w4g128", weight="int4-g64"), progress=False)
    report = size_report(qmodel)
    rows = {path: (n, nbytes, fmt) for path, n, nbytes, fmt in report.rows}
    n, nbytes, fmt = rows["layers/0/mlp/up_proj/kernel"]
    assert fmt == "int4-g64" and n == 64 * 128
    assert nbytes == n // 2 + (n // 64) * 2  # packed int4 + one fp16 scale per 64 weights
    assert report.parameters == sum(x.size for x in _params(model))


def test_validation_errors_name_the_site(model, calib):
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj.*group_size=96 does not divide"):
        quantize(model, Recipe(name="x", rules=(Rule(pattern=r".*down_proj", weight="int4", weight_options={"group_size": 96}),
                                                Rule(pattern=".*", weight="int8"))), progress=False)
    with pytest.raises(ValueError, match=r"matched no quantization site.*\.\*/qproj"):
        quantize(model, Recipe(name="x", rules=(Rule(pattern=".*/qproj", weight="int8"), Rule(pattern=".*", weight="int8"))),
                 progress=False)
    with pytest.raises(ValueError, match="GPTQ needs an integer format"):
        quantize(model, get("fp8-w8a16", algorithm="gptq"), calib, progress=False)
    with pytest.raises(ValueError, match="need calibration data"):
        quantize(model, "gptq-w8", None, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        quantize(model, "gptq-w8", np.zeros((0, 4), np.int32), progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        quantize(model, "gptq-w8", calib + 100, progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        quantize(model, "gptq-w5", calib, progress=False)


def test_nan_weight_is_rejected_and_nothing_is_modified(model):
    broken = nnx.clone(model)
    kernel = broken.layers[1].mlp.up_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(np.nan))
    with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj.*NaN"):
        quantize(broken, "rtn-w8", progress=False)
    assert not any(isinstance(v.get_value(), QArray) for _, v in nnx.to_flat_state(nnx.state(broken, nnx.Param)))


def test_already_quantized_model_is_rejected(model):
    qmodel = quantize(model, "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qmodel, "rtn-w8", progress=False)


def test_quantized_model_reports_what_was_done(model):
    recipe = get("rtn-w8a8")
    report = quantize(model, recipe, progress=False).quantization
    assert report.recipe == recipe and dataclasses.is_dataclass(report)
    assert report.site("layers/0/self_attn/q_proj") == "int8 (rtn), activations int8"
    assert report.site("lm_head") == "float"


def test_static_activation_scale_is_calibrated_from_the_largest_input(model, calib):
    qmodel = quantize(model, "rtn-w8a8-static", calib, progress=False)
    # reference: layer 0's q_proj sees the normed embeddings of the calibration tokens
    hidden, _ = model.block_inputs(calib)
    normed = np.asarray(model.layers[0].input_layernorm(hidden), np.float64)
    expected = np.float16(np.abs(normed).max() / 127)
    assert float(qmodel.layers[0].self_attn.q_proj.activation_scale.get_value()) == float(expected)
    assert qmodel.quantization.site("layers/1/mlp/down_proj") == "int8 (rtn), activations int8-tensor static"
    site = qmodel.layers[1].mlp.down_proj
    expected = site.activation_scale.get_value().astype(np.float32)
    # the forward really uses the static scale: a scaled-up input saturates instead of rescaling
    x = np.full((1, 1, 128), 1e3, np.float32)
    y = np.asarray(site(x))
    saturated = np.full((1, 1, 128), 127 * float(expected), np.float32) @ np.asarray(site.kernel.get_value().dequantize(np.float32))
    np.testing.assert_allclose(y, saturated, rtol=1e-5, atol=1e-6 * np.abs(saturated).max())


def test_static_activation_needs_a_per_tensor_int_format(model, calib):
    with pytest.raises(ValueError, match="symmetric per-tensor integer format"):
        quantize(model, get("rtn-w8a8-static", activation="int8"), calib, progress=False)


def test_gptq_compiles_its_sweep_once_per_distinct_input_size(calib, caplog):
    from jquant.sites import find_sites

    # a config no other test uses, 3 layers = 21 GPTQ sites
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
    model = llama.init_model(cfg, jax.random.key(1))
    shapes = {s.weight.get_value().shape for s in find_sites(model) if s.path.startswith("layers/")}
    assert len(shapes) == 4  # q/o [32, 32], k/v [32, 16], gate/up [32, 96], down [96, 32]
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"):
            quantize(model, get("gptq-w4g128", weight="int4-g32-asym"), calib, progress=False)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if "Compiling jit(gptq_sweep)" in r.getMessage()]
    assert len(compiles) == len({shape[0] for shape in shapes}) == 2, compiles  # in 32 (six sites) and 96 (down)


def test_non_finite_activations_during_calibration_are_reported(model, calib):
    broken = nnx.clone(model)
    norm = broken.layers[1].post_attention_layernorm.weight
    norm.set_value(norm.get_value() * np.inf)
    with pytest.raises(ValueError, match=r"layers/1/mlp/\w+_proj.*NaN or Inf"):
        quantize(broken, "gptq-w8", calib, progress=False)


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w4g64", "fp8-w8a16", "rtn-w8a8", "rtn-w8a8-static",
                                    "smoothquant-w8a8", "quarot-w4a16"])
def test_needs_calibration_says_whether_quantize_reads_the_calibration(model, calib, recipe):
    """``needs_calibration`` against what ``quantize`` does: without calibration it refuses exactly the recipes said
    to need it, and the others give the same model whatever calibration is passed."""
    from jquant.quantization import needs_calibration

    if needs_calibration(model, recipe):
        with pytest.raises(ValueError, match="calib"):
            quantize(model, recipe, None, progress=False)
    else:
        other = np.random.default_rng().integers(0, 64, size=(4, 8)).astype(np.int32)
        for a, b in zip(_params(quantize(model, recipe, None, progress=False)),
                        _params(quantize(model, recipe, other, progress=False)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
