"""MambaQuant on the Mamba families: the KLT variance property, and float64 exactness of every transform
(residual rotation, S-SiLU / gated-norm smoothing, dt-path smoothing and KLT rotation, online out_proj Hadamard)
alone and all together, and its gain over RTN at W8A8 / W4A8 on a model with planted outliers.

Models are tiny random Mamba-1 / Mamba-2 (kernels ~ N(0, 1/in), non-unit norm gains, biases on in/out_proj,
embedding columns × 20 as outliers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.models import mamba, mamba2

from jquant.calib.capture import model_input_statistics
from jquant.quantization import quantize
from jquant.recipes import Recipe, Rule
from jquant.testing.tiny_models import fast_logits, redrawn_model
from jquant.transforms.equivalence import merge_weights, module_at, split_weights
from jquant.transforms.klt import klt_basis, klt_rotation, random_hadamard_rotation
from jquant.transforms.mamba_rotation import (
    apply_mamba_transforms,
    mambaquant,
    mambaquant_params,
)

VOCAB = 61


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _config(kind):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=8, use_bias=True, dtype="float64",
                  param_dtype="float64")
    if kind == "mamba1":
        return mamba.MambaConfig(**common, time_step_rank=4)
    return mamba2.Mamba2Config(**common, num_heads=4, head_dim=16, chunk_size=8)


def _model(kind, seed=0):
    family = mamba if kind == "mamba1" else mamba2
    model = family.init_model(_config(kind), jax.random.key(seed))
    graphdef, w, rest = split_weights(model)
    rng = np.random.default_rng(seed)
    new = {}
    for path, v in w.items():
        leaf = path.rsplit("/", 1)[-1]
        shape = v.shape
        if leaf == "kernel":
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif leaf == "embedding":
            a = rng.standard_normal(shape)
            a[:, [3, 17]] *= 20.0
        elif leaf == "weight" and "conv1d" not in path:
            a = np.exp(0.3 * rng.standard_normal(shape))
        elif leaf == "bias" and "dt" not in path:
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = np.asarray(v)
        new[path] = jnp.asarray(a, v.dtype)
    return merge_weights(graphdef, new, rest, model)


def _tokens(seed=1, batch=2, length=12):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diagonal(r))[None, :]


def _check_exact(model, params, online=False):
    tokens = jnp.asarray(_tokens())
    out = apply_mamba_transforms(model, params, online=online)
    rel = _rel(fast_logits(out, tokens), fast_logits(model, tokens))
    assert rel < 1e-9, rel
    return out


# ---- KLT --------------------------------------------------------------------------------------------
def test_klt_equalises_channel_variances():
    """Var((X K H)_j) = tr(Σ)/n for every j (spec §3.3); a Hadamard alone leaves them unequal."""
    rng = np.random.default_rng(0)
    n, t = 32, 4096
    latent = rng.standard_normal((t, n)) * np.r_[[30.0, 10.0, 5.0], np.ones(n - 3)]
    x = latent @ rng.standard_normal((n, n)) + 3.0
    cov = np.cov(x, rowvar=False)
    h = random_hadamard_rotation(n, jax.random.key(0), "test")
    k = klt_basis(cov)
    np.testing.assert_allclose(k @ k.T, np.eye(n), atol=1e-12)
    var_klt = np.var(x @ klt_rotation(cov, h), axis=0, ddof=1)
    var_had = np.var(x @ h, axis=0, ddof=1)
    np.testing.assert_allclose(var_klt, np.trace(cov) / n, rtol=1e-9)
    assert var_had.max() / var_had.min() > 2.0


# ---- exactness of each fold (float64) ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_residual_rotation_is_exact(kind, rotation):
    d = 32
    r = random_hadamard_rotation(d, jax.random.key(3), "test") if rotation == "hadamard" else _orthogonal(d, 3)
    out = _check_exact(_model(kind), {"residual": r})
    assert out.lm_head is not None  # the tied head was untied to carry R1ᵀ


def _mamba1_blocks(entries, seed=5):
    rng = np.random.default_rng(seed)
    make = {"gate_scale": lambda: np.exp(rng.standard_normal(64)), "dt_scale": lambda: np.exp(rng.standard_normal(4)),
            "dt_rotation": lambda: _orthogonal(4, int(rng.integers(1 << 30)))}
    return {"blocks": [{e: make[e]() for e in entries} for _ in range(2)]}


@pytest.mark.parametrize("entries", [("gate_scale",), ("dt_scale",), ("dt_rotation",)])
def test_mamba1_block_transform_is_exact(entries):
    out = _check_exact(_model("mamba1"), _mamba1_blocks(entries))
    if "gate_scale" in entries:
        assert module_at(out, "layers/0/mixer").gate_scale is not None  # S-SiLU switched on


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_online_out_proj_hadamard_is_exact(kind):
    out = _check_exact(_model(kind), {}, online=True)
    assert module_at(out, "layers/1/mixer/out_proj").input_rotation == 64


def test_mamba2_gated_norm_smoothing_is_exact():
    s = np.exp(np.random.default_rng(2).standard_normal(64))
    _check_exact(_model("mamba2"), {"blocks": [{"gate_scale": s}, {"gate_scale": 1.0 / s}]})


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_mambaquant_all_together_is_exact_and_equalises_variances(kind):
    """The full transform (KLT R1, S2, S5 + KLT R5, online R2) keeps logits; R1 and R5 equalise the variances of
    exactly the activations they rotate (spec §7.1, §7.4)."""
    model = _model(kind)
    calib = _tokens(seed=7, batch=4, length=16)
    out = mambaquant(model, calib, jax.random.key(0))
    tokens = jnp.asarray(_tokens())
    rel = _rel(fast_logits(out, tokens), fast_logits(model, tokens))
    assert rel < 1e-9, rel
    sites = ["layers/0/mixer/in_proj"] + (["layers/0/mixer/dt_proj", "layers/1/mixer/dt_proj"] if kind == "mamba1"
                                          else [])
    stats = model_input_statistics(out, calib, set(sites))
    plain = model_input_statistics(mambaquant(model, calib, jax.random.key(0), klt=False), calib, set(sites))
    for site in sites:  # capture accumulates float32 products: equal to ~1e-7
        var = np.diagonal(stats[site].covariance)
        np.testing.assert_allclose(var, var.mean(), rtol=1e-5, err_msg=site)
        var_plain = np.diagonal(plain[site].covariance)
        assert var_plain.max() / var_plain.min() > 1.1, site  # a Hadamard alone does not equalise them


def test_mambaquant_params_without_klt_are_plain_hadamards():
    params = mambaquant_params(_model("mamba1"), _tokens(seed=7), jax.random.key(0), klt=False, smooth=False)
    np.testing.assert_allclose(np.abs(params["residual"]), 1 / np.sqrt(32), rtol=1e-12)
    assert set(params["blocks"][0]) == {"dt_rotation"}


# ---- quantized quality (float32) -------------------------------------------------------------------------
OUTLIER_VOCAB = 128
"""More tokens than the outlier model's 64 channels, so calibration text gives a full-rank covariance at the first
block: with fewer (61), KLT's basis of the covariance's null space is whatever float rounding makes it, and the W4A8
ratio below moved from 0.60 to 0.81 when the captured sums' rounding changed by 1e-7 (traced, 2026-12-06)."""


def _outlier_mamba(seed=0):
    """A float32 Mamba-1 with spec §5's planted outliers: norm gains × 8 on 3 channels, 3 gate rows of in_proj × 4,
    long-memory ``A_log`` rows (Ā ≈ 1)."""
    cfg = mamba.MambaConfig(vocab_size=OUTLIER_VOCAB, hidden_size=64, num_layers=2, state_size=16, time_step_rank=4)

    def plant(path, a, rng):
        if path.endswith("/norm/weight"):
            a = np.exp(0.3 * rng.standard_normal(a.shape))
            a[[3, 17, 40]] *= 8.0
        elif path.endswith("A_log"):
            a[:8] = -2.0
        if path.endswith("in_proj/kernel"):
            a[:, 128 + np.array([5, 60, 100])] *= 4.0
        return a

    return redrawn_model(mamba.init_model(cfg, jax.random.key(seed)), seed, plant)


def _kl(logits, ref):
    lp, lq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(logits, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))


def test_mambaquant_beats_rtn_at_w8a8_and_w4a8():
    """RTN weights with per-tensor asymmetric int8 activations (spec §3.8): plain, after MambaQuant, and after the
    QuaRot-style baseline (Hadamard rotations with the online out_proj Hadamard, no KLT or smoothing), on three seeds
    (model, calibration and held-out tokens, rotation key). W8A8: MambaQuant and the baseline each a clear win over
    RTN on every seed (about 0.13x RTN's KL). W4A8: MambaQuant wins on average but not on every seed (seed 0: 1.09x;
    seeds 1, 2: 0.78x, 0.63x), so the test asserts the mean KL.

    Not asserted, because it does not hold here: the spec's "MambaQuant beats the QuaRot-style baseline". On this
    model the baseline is as good or better at W8A8 (KL 0.0017-0.0030 vs MambaQuant's 0.0029-0.0032) and ties at
    W4A8 (mean 0.190 vs 0.186), as jq-mamba-small's results show (experiments/results/mambaquant.md): a Hadamard
    alone handles outliers planted in norm gains and in_proj rows."""
    kl = {"int8": ([], [], []), "int4": ([], [], [])}
    with jax.enable_x64(False):
        for seed in range(3):
            model = _outlier_mamba(seed)
            rng = np.random.default_rng(1 + seed)
            calib = rng.integers(0, OUTLIER_VOCAB, (8, 64)).astype(np.int32)
            tokens = jnp.asarray(rng.integers(0, OUTLIER_VOCAB, (8, 64)).astype(np.int32))
            ref = fast_logits(model, tokens)
            rotated = mambaquant(model, calib, jax.random.key(seed))
            baseline = mambaquant(model, calib, jax.random.key(seed), klt=False, smooth=False)
            for weight, lists in kl.items():
                recipe = Recipe(name=f"rtn-{weight}a8", rules=(Rule(
                    pattern=".*", weight=weight, activation="int8-tensor", activation_options={"symmetric": False}),))
                for m, out in zip((model, rotated, baseline), lists):
                    out.append(_kl(fast_logits(quantize(m, recipe, progress=False), tokens), ref))
    rtn, mq, quarot_style = map(np.asarray, kl["int8"])
    assert np.all(mq < 0.5 * rtn) and np.all(quarot_style < 0.5 * rtn), (mq, quarot_style, rtn)
    rtn, mq, _ = map(np.asarray, kl["int4"])
    assert mq.mean() < rtn.mean(), (mq, rtn)


def test_decoder_transforms_refuse_a_mamba_model_clearly():
    from jquant.transforms.layout import layout_of

    with pytest.raises(ValueError, match="not a DecoderLayout.*MambaQuant"):
        layout_of(_model("mamba1"))
