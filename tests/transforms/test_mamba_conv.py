"""The Mamba conv1d as a quantization site (MambaQuant site a1) and its S7 smoothing (spec §3.6).

The depthwise convolution's weights quantize per channel over the taps, its inputs per call like a linear's; S7
(``W_u / s``, conv taps ``· s``) is exact in float64 and evens out the conv input's channels, so per-tensor int8
inputs lose less.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.models import mamba, mamba2

from jquant import ops
from jquant.checkpoint import load, save
from jquant.formats import dequantize, get_format, quantize
from jquant.quantization import quantize as quantize_model
from jquant.recipes import Recipe, Rule, TransformStep, get
from jquant.testing.tiny_models import fast_logits, redrawn_model
from jquant.transforms.equivalence import module_at
from jquant.transforms.mamba_rotation import apply_mamba_transforms, mambaquant_params

VOCAB = 96


def _numpy_conv(x, w, b, state):
    """``y_t[c] = b[c] + sum_k w[k, c] x_{t-K+1+k}[c]`` over ``[state, x]`` in float64."""
    padded = np.concatenate([state, x], axis=1)
    k, t = w.shape[0], x.shape[1]
    return sum(w[j] * padded[:, j:j + t] for j in range(k)) + b


@pytest.mark.parametrize("activation", ["int8-asym", "int8-tensor-asym"])
def test_quantized_conv_is_the_dequantized_taps_on_this_calls_quantized_inputs(activation):
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 9, 6)) * np.r_[1, 1, 30, 1, 1, 1], jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)
    state = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
    qw = quantize(w, "int4-asym", axis=0)  # one scale per channel over its 4 taps
    fmt = get_format(activation)
    y, new_state = ops.causal_conv1d(x, qw, b, state, activation=fmt)
    if activation == "int8-tensor-asym":  # one scale per sequence, as linear's per-tensor dynamic inputs
        xq = np.stack([np.asarray(dequantize(quantize(x[i], fmt, axis=-1))) for i in range(2)])
    else:
        xq = np.asarray(dequantize(quantize(x, fmt, axis=-1)))
    ref = _numpy_conv(np.float64(xq), np.float64(dequantize(qw)), np.float64(b), np.float64(state))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new_state), xq[:, -3:])  # the state keeps the quantized inputs
    assert not np.allclose(xq, np.asarray(x), rtol=1e-3)  # the inputs were quantized


def _mamba1(seed=0, dtype="float32"):
    """A Mamba-1 whose conv input ``u`` has outlier channels (3 u-columns of in_proj x 20)."""
    cfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=8, time_step_rank=4,
                            use_bias=True, dtype=dtype, param_dtype=dtype)

    def plant(path, a, rng):
        if path.endswith("in_proj/bias"):
            return 0.1 * rng.standard_normal(a.shape)
        if path.endswith("in_proj/kernel"):
            a[:, [2, 30, 51]] *= 20.0
        return a

    return redrawn_model(mamba.init_model(cfg, jax.random.key(seed)), seed, plant)


def _tokens(seed, batch=4, length=24):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def test_s7_is_exact_in_float64_and_moves_the_scale_into_the_taps():
    with jax.enable_x64(True):
        model = _mamba1(dtype="float64")
        params = mambaquant_params(model, _tokens(1), jax.random.key(0), smooth=False, rotate=False, smooth_conv=True)
        assert [set(p) for p in params["blocks"]] == [{"conv_scale"}] * 2
        out = apply_mamba_transforms(model, params)
        tokens = jnp.asarray(_tokens(2))
        ref = np.asarray(fast_logits(model, tokens))
        got = np.asarray(fast_logits(out, tokens))
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-10
        s = params["blocks"][0]["conv_scale"]
        taps = np.asarray(module_at(model, "layers/0/mixer/conv1d").weight.get_value())
        np.testing.assert_allclose(np.asarray(module_at(out, "layers/0/mixer/conv1d").weight.get_value()),
                                   taps * s[None, :], rtol=1e-12)
        assert s[[2, 30, 51]].min() > 3 * np.median(s)  # the outlier channels take the largest factors


def test_conv_recipes_quantize_the_conv_and_s7_lowers_its_error():
    """The plain Mamba recipes keep every conv1d float and the ``-conv`` ones quantize it; with only the conv1d
    quantized (int8 weights per channel, per-tensor int8 inputs), S7 brings the logits closer to the float model's
    than the same recipe without it, on three models with outlier channels in the conv input."""
    calib, tokens = _tokens(3, batch=8), jnp.asarray(_tokens(4, batch=8))
    assert quantize_model(_mamba1(), get("rtn-mamba-w8a8"), calib, progress=False).quantization.site(
        "layers/0/mixer/conv1d") == "float"
    assert quantize_model(_mamba1(), get("mambaquant-w8a8-conv"), calib, progress=False).quantization.site(
        "layers/1/mixer/conv1d").startswith("int8")
    errors = {True: [], False: []}
    for seed in range(3):
        model = _mamba1(seed)
        ref = np.asarray(fast_logits(model, tokens))
        for smooth_conv, out in errors.items():
            step = TransformStep("mambaquant", {"smooth": False, "rotate": False, "online": False,
                                                "smooth_conv": smooth_conv})
            recipe = Recipe(name="conv-only", keep_float=("embed_tokens", "lm_head"), transforms=(step,),
                            rules=(Rule(pattern=r".*/conv1d", weight="int8-asym", activation="int8-tensor-asym"),))
            q = quantize_model(model, recipe, calib, progress=False)
            out.append(float(np.mean((np.asarray(fast_logits(q, tokens)) - ref) ** 2)))
    assert np.all(np.asarray(errors[True]) < np.asarray(errors[False])), errors


def test_conv_quantized_model_saves_and_loads_exactly(tmp_path):
    model = _mamba1()
    q = quantize_model(model, get("mambaquant-w4a8-conv"), _tokens(3), progress=False)
    save(q, tmp_path / "q")
    tokens = jnp.asarray(_tokens(5))
    np.testing.assert_array_equal(np.asarray(fast_logits(load(tmp_path / "q"), tokens)),
                                  np.asarray(fast_logits(q, tokens)))


def test_mamba2_conv_quantizes_with_rtn_and_gptq_is_refused_by_name():
    cfg = mamba2.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_layers=1, state_size=8, num_heads=4, head_dim=16,
                              chunk_size=8)
    model = mamba2.init_model(cfg, jax.random.key(0))
    rtn = Recipe(name="rtn-conv", keep_float=("embed_tokens", "lm_head"),
                 rules=(Rule(pattern=r".*/conv1d", weight="int8-asym", activation="int8-tensor-asym"),))
    q = quantize_model(model, rtn, _tokens(3), progress=False)
    assert q.quantization.site("layers/0/mixer/conv1d").startswith("int8")
    gptq = Recipe(name="gptq-conv", keep_float=("embed_tokens", "lm_head"),
                  rules=(Rule(pattern=r".*", weight="int4", algorithm="gptq"),))
    with pytest.raises(ValueError, match=r"layers/0/mixer/conv1d.*depthwise.*'rtn'"):
        quantize_model(model, gptq, _tokens(3), progress=False)
