"""Vector-quantization recipes through quantize / ops / save / load on a tiny Llama."""

import jax
import numpy as np
import pytest

import jquant as jq
from jquant.formats import CodebookFormat, PolarVQFormat, QArray, dequantize
from jquant.models import llama
from jquant.recipes import Recipe, Rule, get
from jquant.testing.tiny_models import fast_logits

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
TOKENS = np.arange(24).reshape(2, 12) % 64
PCDVQ = Recipe(name="pcdvq-test", rules=(Rule(pattern=".*", weight="pcdvq-d8-a8-b2", algorithm="pcdvq"),))
GPTVQ = Recipe(name="gptvq-test", rules=(Rule(pattern=".*", weight="vq-d2-k4-cb32x16", algorithm="gptvq",
                                              options={"finetune_steps": 20}),))


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).integers(0, 64, size=(8, 16)).astype(np.int32)


@pytest.mark.parametrize("recipe", [PCDVQ, GPTVQ], ids=["pcdvq", "gptvq"])
def test_quantize_save_load_round_trip(model, calib, tmp_path, recipe):
    qmodel = jq.quantize(model, recipe, calib, progress=False)
    q = qmodel.layers[1].mlp.down_proj.kernel.get_value()
    assert isinstance(q, QArray) and q.shape == (128, 64)
    assert isinstance(q.format, PolarVQFormat if recipe is PCDVQ else CodebookFormat)
    # packed inference (the lookup paths) equals the same model with dequantized float weights
    sim = jax.tree.map(lambda v: dequantize(v) if isinstance(v, QArray) else v, qmodel,
                       is_leaf=lambda v: isinstance(v, QArray))
    logits = np.asarray(fast_logits(qmodel, TOKENS))
    np.testing.assert_allclose(logits, np.asarray(fast_logits(sim, TOKENS)), rtol=2e-4, atol=2e-4)
    jq.save(qmodel, tmp_path / "ckpt")
    restored = jq.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(fast_logits(restored, TOKENS)), logits)
    size = jq.size_report(qmodel)
    shared = [r for r in size.rows if r[3] == "codebook"]
    if recipe is PCDVQ:  # the shared tables once per model, not per tensor
        assert len(shared) == 1 and shared[0][2] == PolarVQFormat(direction_bits=8).shared_table_bytes
        assert q.bits_per_element == 8 * (q.codes.size + 4) / q.size
    else:
        assert not shared and q.codebooks.shape == (4, 4, 1, 16, 2)


def test_plan_rejects_format_algorithm_mismatches(model, calib):
    with pytest.raises(ValueError, match="needs learned codebooks; use algorithm 'gptvq'"):
        jq.quantize(model, Recipe(name="x", rules=(Rule(pattern=".*", weight="vq-d2-k4"),)), calib, progress=False)
    with pytest.raises(ValueError, match="gptvq needs a codebook format"):
        jq.quantize(model, get("gptvq-w2", weight="int4"), calib, progress=False)
    with pytest.raises(ValueError, match="pcdvq needs a polar format"):
        jq.quantize(model, get("pcdvq-w2", weight="int4"), calib, progress=False)
    with pytest.raises(ValueError, match=r"site 'embed_tokens'.*handles \[in, out\] weights"):
        jq.quantize(model, Recipe(name="x", rules=(Rule(pattern=".*", weight="pcdvq-d8-a8-b2", algorithm="pcdvq"),),
                           keep_float=()), calib, progress=False)
    with pytest.raises(ValueError, match="unknown pcdvq options"):
        jq.quantize(model, get("pcdvq-w2", weight="pcdvq-d8-a8-b2", options={"bogus": 1}), calib, progress=False)
    with pytest.raises(ValueError, match="calibration data"):
        jq.quantize(model, PCDVQ, None, progress=False)


def test_builtin_vq_recipes_name_their_formats():
    for bits in ("w2", "w2.25", "w3"):
        for family in ("gptvq", "pcdvq"):
            rule = get(f"{family}-{bits}").rules[0]
            fmt = jq.formats.get_format(rule.weight)
            assert rule.algorithm == family and fmt.name == rule.weight
    assert jq.formats.get_format(get("pcdvq-w2").rules[0].weight).index_bits_per_weight == 2.0
