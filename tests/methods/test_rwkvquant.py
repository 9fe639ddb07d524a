"""RWKVQuant end to end on a tiny random RWKV-6: per-site SQ/VQ by the proxy, element-wise codebooks, bits, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from jquant.algorithms.rwkvquant import MixConfig, mix_codebook
from jquant.checkpoint import load, save
from jquant.formats import CodebookFormat, IntFormat, QArray, dequantize, get_format
from jquant.methods.rwkvquant import RWKVQuantConfig, rwkvquant, rwkvquant_recipe
from jquant.models import rwkv6
from jquant.sites import find_sites

VOCAB = 64
CFG = rwkv6.RWKV6Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=2, head_size=64,
                        mix_rank=32, decay_rank=64, chunk_size=4)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(4, 16)).astype(np.int32)
CONFIG = RWKVQuantConfig(vq_fraction=0.25, vq_options={"finetune_steps": 10})


def _model():
    """Random RWKV-6 with the zero-initialised LoRA down-projections filled (so every proxy is informative)."""
    model = rwkv6.init_model(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    for site in find_sites(model):
        w = site.weight.get_value()
        if site.spec.kind == "linear" and not np.any(np.asarray(w)):
            site.weight.set_value(jnp.asarray(0.1 * rng.standard_normal(w.shape), w.dtype))
    return model


def _spec_proxy(weight: np.ndarray) -> tuple[float, float]:
    """RWKVQuant's (P_c, P_f) written from the spec (§3.2) apart from the library: the distinct positive gaps of the
    sorted float16 entries, normalised to p; P_c = ln n - H(p) (scipy's entropy), P_f = Σ_k n^k/(k(k-1)) |M_k|."""
    w = np.sort(np.asarray(weight).astype(np.float16).astype(np.float64).ravel())
    gaps = np.unique(np.diff(w))
    p = gaps[gaps > 0] / gaps[gaps > 0].sum()
    n = len(p)
    moments = [np.mean((p - 1 / n) ** k) for k in (2, 3, 4)]
    fine = sum(n**k / (k * (k - 1)) * abs(m) for k, m in zip((2, 3, 4), moments))
    return max(np.log(n) - scipy.stats.entropy(p), 0.0), fine


@pytest.fixture(scope="module")
def quantized():
    model = _model()
    qmodel, report = rwkvquant(model, TOKENS, CONFIG, progress=False)
    return model, qmodel, report


def test_activation_weighting_lowers_the_activation_weighted_error():
    rng = np.random.default_rng(0)
    mu = rng.uniform(0, 1, 256)
    s = np.where(rng.uniform(size=256) < 0.1, 100.0, 1.0) * rng.uniform(0.5, 1.5, 256)  # a few loud channels
    fmt = get_format("vq-d1-k3-cb64xall")
    weighted = np.asarray(dequantize(mix_codebook(jnp.asarray(mu, jnp.float32), fmt, s)), np.float64)
    plain = np.asarray(dequantize(mix_codebook(jnp.asarray(mu, jnp.float32), fmt, np.ones(256))), np.float64)
    loss = lambda q: float(np.sum(s * (mu - q) ** 2))  # noqa: E731  (spec §3.5: Σ_c s_c (μ_c − μ̂_c)²)
    assert loss(weighted) < 0.7 * loss(plain)
    assert np.sum((mu - plain) ** 2) <= np.sum((mu - weighted) ** 2)  # the unweighted fit wins its own objective


def test_every_linear_takes_exactly_the_method_its_proxy_chooses(quantized):
    model, qmodel, report = quantized
    float_w = {s.path: np.asarray(s.weight.get_value()) for s in find_sites(model)}
    by_path = {c.path: c for c in report.sites}
    linear = [s for s in find_sites(qmodel) if s.spec.kind == "linear" and s.path != "lm_head"]
    assert {s.path for s in linear} == {c.path for c in report.sites if c.method != "mix"}
    # per-model percentile: 8 of 32 linears, more only where two matrices tie in their percentile score
    assert 0.25 <= report.vq_fraction <= 10 / 32
    for site in linear:
        choice, q = by_path[site.path], site.weight.get_value()
        coarse, fine = _spec_proxy(float_w[site.path])
        np.testing.assert_allclose([choice.coarse, choice.fine], [coarse, fine], rtol=1e-9, atol=1e-12)
        vq = not (coarse < report.tau_c and fine < report.tau_f)  # scalar iff close to uniform and no outlier
        assert choice.method == ("vq" if vq else "sq")
        assert isinstance(q, QArray) and isinstance(q.format, CodebookFormat if vq else IntFormat)
        assert q.format.name == choice.format
        assert qmodel.quantization.site(site.path) == f"{choice.format} (rwkvquant)"
        assert choice.bits_per_weight == q.bits_per_element
    assert qmodel.quantization.site("lm_head") == "float"


def test_elementwise_sites_get_codebooks_and_bits_are_reported(quantized):
    _, qmodel, report = quantized
    mixes = [s for s in find_sites(qmodel) if s.spec.kind == "elementwise"]
    assert len(mixes) == 8 * CFG.num_layers
    for site in mixes:
        q = site.weight.get_value()
        assert isinstance(q.format, CodebookFormat) and q.codebooks.shape == (CFG.hidden_size // 64, 1, 8, 1)
        assert len(np.unique(np.asarray(dequantize(q)[:64]))) <= 8
    # bits from the stored arrays: 3-bit codes + float16 scales/zeros or 8 float16 codewords per 512 weights
    assert 3.1 < report.bits_per_weight() < 3.5
    assert report.bits_per_weight(("mix",)) == pytest.approx(3 + 8 * 16 / 64)
    vq = [c for c in report.sites if c.method == "vq"]
    assert all(c.bits_per_weight == pytest.approx(3 + 8 * 16 / 512) for c in vq)


def test_quantized_model_runs_its_stored_codes_and_round_trips(quantized, tmp_path):
    model, qmodel, _ = quantized
    logits = np.asarray(qmodel(TOKENS))
    simulated = nnx.clone(qmodel)  # the float forward on weights set to the dequantized codes
    for _, var in nnx.to_flat_state(nnx.state(simulated, nnx.Param)):
        if isinstance(var.get_value(), QArray):
            var.set_value(dequantize(var.get_value(), np.float32))
    np.testing.assert_allclose(logits, np.asarray(simulated(TOKENS)), rtol=1e-5, atol=1e-5)
    ref = np.asarray(model(TOKENS))
    assert np.linalg.norm(logits - ref) < 0.5 * np.linalg.norm(ref)  # about 3.25 bits/weight stays near float
    save(qmodel, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), logits)
    assert restored.quantization.sites == qmodel.quantization.sites


def test_fixed_thresholds_build_the_per_site_recipe():
    model = _model()
    recipe, report = rwkvquant_recipe(model, RWKVQuantConfig(tau_c=float("inf"), tau_f=float("inf")))
    assert {c.method for c in report.sites} == {"sq", "mix"}  # nothing reaches an infinite threshold
    recipe, report = rwkvquant_recipe(model, RWKVQuantConfig(tau_c=0.0))
    assert {c.method for c in report.sites} == {"vq", "mix"}
    assert all(r.algorithm == "rwkvquant" for r in recipe.rules) and len(recipe.rules) == len(report.sites)


@pytest.mark.parametrize("changes, match", [
    ({"tau_c": -1.0}, "threshold tau_c"),
    ({"tau_f": float("nan")}, "threshold tau_f"),
    ({"vq_fraction": 1.5}, "vq_fraction"),
    ({"sq_format": "vq-d1-k3-cb32x16"}, "sq_format.*IntFormat"),
    ({"sq_format": "int3-tensor"}, "sq_format.*per-tensor"),
    ({"vq_format": "int3-g128"}, "vq_format.*CodebookFormat"),
    ({"vq_format": "int9"}, "vq_format.*Unknown format"),
])
def test_bad_settings_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        RWKVQuantConfig(**changes)


def test_bit_presets_and_bad_bits():
    assert RWKVQuantConfig.preset(3.0).sq_format == "int3-asym"
    assert RWKVQuantConfig.preset(3.25) == RWKVQuantConfig()
    with pytest.raises(ValueError, match="bits setting 2.5"):
        RWKVQuantConfig.preset(2.5)
    with pytest.raises(ValueError, match="importance"):
        MixConfig(importance="abs")


def test_a_group_that_does_not_divide_a_site_names_it():
    with pytest.raises(ValueError, match=r"site 'layers/0/att/gate'.*codebook_rows=48"):
        rwkvquant_recipe(_model(), RWKVQuantConfig(vq_format="vq-d1-k3-cb48x16", tau_c=0.0))
