"""Outlier statistics: each checked against float64 numpy written here (or scipy), and a planted outlier found."""

import numpy as np
import pytest
import scipy.stats

from jquant.calib.capture import InputStatistics
from jquant.eval.outliers import hidden_outliers, model_outliers, site_outliers
from jquant.models import llama
from jquant.testing.tiny_models import outlier_model

CFG = llama.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, dtype="float32")
PLANTED = 13


def _stats(x: np.ndarray) -> InputStatistics:
    return InputStatistics(hessian=x.T @ x, count=float(len(x)), absmax=np.abs(x).max(0), total=x.sum(0))


def test_site_statistics_follow_their_definitions():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 1.5, 32)
    sigma[5] = 12.0
    x = rng.standard_normal((20000, 32)) * sigma
    got = site_outliers(_stats(x))
    absmax, rms = np.abs(x).max(0), np.sqrt(np.mean(x**2, 0))
    assert got.top_channel == 5 and got.tokens == len(x)
    np.testing.assert_allclose(got.absmax_ratio, absmax.max() / np.median(absmax), rtol=1e-12)
    np.testing.assert_allclose(got.rms_ratio, rms.max() / np.median(rms), rtol=1e-9)
    # channel kurtosis = the kurtosis of a token's entries when channel c is N(0, σ_c²): pool the entries
    entries = x.ravel()
    np.testing.assert_allclose(got.channel_kurtosis, np.mean(entries**4) / np.mean(entries**2) ** 2, rtol=0.05)
    equal = site_outliers(_stats(rng.standard_normal((20000, 32))))
    assert equal.channel_kurtosis == pytest.approx(3.0, rel=0.05) and equal.rms_ratio < 1.1


def test_grouped_statistics_are_pooled_over_groups():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50, 8)), 3 * rng.standard_normal((70, 8))
    grouped = InputStatistics(hessian=np.stack([a.T @ a, b.T @ b]), count=np.array([50.0, 70.0]),
                              absmax=np.stack([np.abs(a).max(0), np.abs(b).max(0)]))
    got, want = site_outliers(grouped), site_outliers(_stats(np.concatenate([a, b])))
    assert got.group_tokens == (50.0, 70.0) and want.group_tokens is None and got.top_channel == want.top_channel
    np.testing.assert_allclose([got.absmax_ratio, got.rms_ratio, got.channel_kurtosis, got.tokens],
                               [want.absmax_ratio, want.rms_ratio, want.channel_kurtosis, want.tokens], rtol=1e-12)
    with pytest.raises(ValueError, match="count no tokens"):
        site_outliers(InputStatistics(hessian=np.zeros((8, 8)), count=0.0, absmax=np.zeros(8)))


def test_hidden_statistics_match_scipy_and_find_the_massive_entry():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 40, 16))
    x[1, 7, 11] = -500.0
    got = hidden_outliers(x)
    np.testing.assert_allclose(got.kurtosis, scipy.stats.kurtosis(x.ravel(), fisher=True) + 3, rtol=1e-9)
    mags = np.sort(np.abs(x.ravel()))
    np.testing.assert_allclose(got.top_over_median, mags[-1] / np.median(mags), rtol=1e-12)
    assert (got.top, got.top_token, got.top_channel) == (500.0, 7, 11)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, d\]"):
        hidden_outliers(np.ones(5))


@pytest.mark.parametrize("factor", [1.0, 40.0])
def test_planted_embedding_outlier_channel_is_found(factor):
    """An embedding column × ``factor`` (a residual-stream outlier channel): block 0's input statistics equal numpy's
    on the looked-up embeddings, and the first attention input's channel statistics equal numpy's RMSNorm of them."""
    model = outlier_model(CFG, 0, outliers=(PLANTED,), factor=factor, random_gains=False)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (4, 24))
    report = model_outliers(model, tokens, batch_size=2)
    embed = np.asarray(model.embed_tokens.embedding.get_value(), np.float64)[tokens]
    want = hidden_outliers(embed)
    path, got = report.blocks[0]
    assert path == "layers/0" and [p for p, _ in report.blocks] == ["layers/0", "layers/1"]
    np.testing.assert_allclose([got.kurtosis, got.top_over_median], [want.kurtosis, want.top_over_median], rtol=1e-5)
    normed = embed / np.sqrt(np.mean(embed**2, -1, keepdims=True) + CFG.rms_norm_eps)
    site = report.sites["layers/0/self_attn/q_proj"]
    ref = site_outliers(_stats(normed.reshape(-1, CFG.hidden_size)))
    np.testing.assert_allclose([site.absmax_ratio, site.rms_ratio, site.channel_kurtosis],
                               [ref.absmax_ratio, ref.rms_ratio, ref.channel_kurtosis], rtol=1e-4)
    assert report.output is not None and set(report.sites) >= {"layers/1/mlp/down_proj", "layers/0/self_attn/o_proj"}
    if factor > 1:
        # RMSNorm caps one channel near sqrt(d) = 8 times the others' scale, so the range ratio stays below that
        assert site.top_channel == got.top_channel == PLANTED and site.absmax_ratio > 4 and site.rms_ratio > 10
        assert site.channel_kurtosis > 30 and got.top_over_median > 50
    else:
        assert site.absmax_ratio < 3 and site.channel_kurtosis < 6
