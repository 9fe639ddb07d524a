"""SmoothQuant and QuaRot as model -> model transforms: exact in float, the SmoothQuant scales against an independent
recomputation of the paper's formula, QuaRot's width errors, and QuaRot's effect on W4A4 (per-token int4 activations).

Models are tiny random Llamas (kernels ~ N(0, 1/in), non-unit RMSNorm gains) whose embeddings carry a few outlier
channels (×20), the structure that makes activation quantization hard.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.calib.capture import model_input_statistics
from jquant.formats import get_format
from jquant.losses import kl_divergence
from jquant.models import llama
from jquant.testing.tiny_models import FAST_COMPILE, outlier_model
from jquant.transforms import pad_to_hadamard_size, quarot, smoothquant, smoothquant_params, supported_size
from jquant.transforms.equivalence import module_at, split_weights

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)




# ---- helpers -----------------------------------------------------------------------------------------
def _config(dtype="float32", **changes):
    return llama.LlamaConfig(**{**BASE, **changes}, dtype=dtype, param_dtype=dtype)


def _run(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


_forward = jax.jit(_run, static_argnums=0)
_forward_fast = jax.jit(_run, static_argnums=0, compiler_options=FAST_COMPILE)  # float models only


def _logits(model, tokens, *, fast=True):
    graphdef, state = nnx.split(model)
    return np.asarray((_forward_fast if fast else _forward)(graphdef, state, jnp.asarray(tokens, jnp.int32)))


def _tokens(seed, batch, length):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _weights(model):
    return {k: np.asarray(v, np.float64) for k, v in split_weights(model)[1].items()}


# ---- SmoothQuant ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.8])  # not the default 0.5 (the recipes use that)
def test_smoothquant_is_exact_and_follows_the_formula(x64, alpha):
    model = outlier_model(_config("float64"), 1)
    calib = _tokens(2, 4, 16)
    before = _weights(model)
    smoothed = smoothquant(model, calib, alpha)
    fresh = _tokens(3, 2, 12)
    assert _rel(_logits(smoothed, fresh), _logits(model, fresh)) < 1e-9

    # independent reference (paper Eq. 4) on the original model: the activation a norm group's consumers see once its
    # gain γ is folded away is x̂ = (γ ⊙ x̂) / γ, and the consumer weights become diag(γ) W
    layout = model.equivalence_layout()
    groups = [(i, g, name) for i, layer in enumerate(layout.layers)
              for g, name in ((layer.attn_norm, "attn_scale"), (layer.mlp_norm, "mlp_scale"))]
    sites = {g.consumers[0] for _, g, _ in groups}
    old = model_input_statistics(model, calib, sites)
    new = model_input_statistics(smoothed, calib, sites)
    params = smoothquant_params(model, calib, alpha)
    after = _weights(smoothed)
    for i, group, name in groups:
        gain = before[f"{group.norm}/weight"]
        act = old[group.consumers[0]].absmax / np.abs(gain)
        w_max = np.max([np.max(np.abs(gain[:, None] * before[f"{c}/kernel"]), axis=1) for c in group.consumers], axis=0)
        s = act**alpha / w_max ** (1 - alpha)
        used = np.asarray(params["layers"][i][name], np.float64)
        np.testing.assert_allclose(used, s, rtol=1e-5, err_msg=f"layer {i} {name}")
        # the smoothed model's activations are divided by s, its consumer weights multiplied by it
        np.testing.assert_allclose(new[group.consumers[0]].absmax, act / used, rtol=1e-5, err_msg=f"layer {i} {name}")
        np.testing.assert_allclose(after[f"{group.norm}/weight"], 1 / used, rtol=1e-12)
        for c in group.consumers:
            np.testing.assert_allclose(after[f"{c}/kernel"], (used * gain)[:, None] * before[f"{c}/kernel"], rtol=1e-9)
        # migrating the outliers into the weights narrows the spread of the per-channel activation ranges
        spread = lambda a: a.max() / np.median(a)  # noqa: E731
        assert spread(act / used) < spread(act), (i, name)
    assert all(layer.mlp.down_proj.input_rotation is None and not layer.self_attn.qk_rotation
               for layer in smoothed.layers)
    for path, value in _weights(model).items():  # the input model is not modified
        np.testing.assert_array_equal(value, before[path], err_msg=path)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_smoothquant_alpha_out_of_range(alpha):
    model = outlier_model(_config(num_layers=1), 4)
    with pytest.raises(ValueError, match=r"alpha .*\[0, 1\]"):
        smoothquant(model, _tokens(5, 2, 8), alpha)


# ---- QuaRot: exactness and widths ------------------------------------------------------------------------
# QuaRot builds its rotations in float64, so both kinds are exact in a float64 model.
@pytest.mark.parametrize("rotation, tol", [("hadamard", 1e-9), ("orthogonal", 1e-9)])
def test_quarot_is_exact_in_float64(x64, rotation, tol):
    cfg = _config("float64")
    assert supported_size(cfg.intermediate_size) and cfg.intermediate_size & (cfg.intermediate_size - 1)  # 96 = 12 · 8
    model = outlier_model(cfg, 10)
    before = _weights(model)
    rotated = quarot(model, jax.random.key(11), rotation=rotation)  # online=("down", "qk") by default
    tokens = _tokens(12, 2, 12)
    assert _rel(_logits(rotated, tokens), _logits(model, tokens)) < tol
    after = _weights(rotated)
    assert _rel(after["embed_tokens/embedding"], before["embed_tokens/embedding"]) > 0.1
    r = np.linalg.lstsq(before["embed_tokens/embedding"], after["embed_tokens/embedding"], rcond=None)[0]
    np.testing.assert_allclose(r.T @ r, np.eye(64), atol=1e-6)  # the embedding was rotated, E ← E R
    if rotation == "hadamard":
        np.testing.assert_allclose(np.abs(r), 1 / 8, atol=1e-10)  # R = diag(ε) H / √64
    for layer in rotated.layers:
        assert layer.mlp.down_proj.input_rotation == 96 and layer.self_attn.qk_rotation
    for path, value in _weights(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


@pytest.mark.parametrize("rotation, hidden", [("orthogonal", 64), ("hadamard", 128)])
def test_quarot_float64_exact_for_any_rotation(x64, rotation, hidden):
    model = outlier_model(_config("float64", hidden_size=hidden), 13)
    tokens = _tokens(14, 2, 12)
    assert _rel(_logits(quarot(model, jax.random.key(15), rotation=rotation), tokens), _logits(model, tokens)) < 1e-9


def test_quarot_unsupported_widths(x64):
    cfg = _config("float64", hidden_size=88, intermediate_size=128)  # 88 = 11 · 8, head_dim 22: no Hadamard
    assert not supported_size(88) and not supported_size(cfg.head_dim)
    model = outlier_model(cfg, 20)
    with pytest.raises(ValueError, match=rf"width 88 .*{pad_to_hadamard_size(88)}.*rotation='orthogonal'"):
        quarot(model, jax.random.key(0))
    # an orthogonal residual rotation works, but the online q/k Hadamard needs a Hadamard head size
    with pytest.raises(ValueError, match=r"layers/0/self_attn: head_dim 22 .*'qk'"):
        quarot(model, jax.random.key(0), rotation="orthogonal")
    rotated = quarot(model, jax.random.key(0), rotation="orthogonal", online=("down",))
    tokens = _tokens(21, 2, 10)
    assert _rel(_logits(rotated, tokens), _logits(model, tokens)) < 1e-9
    assert rotated.layers[0].mlp.down_proj.input_rotation == 128 and not rotated.layers[0].self_attn.qk_rotation


# ---- QuaRot at W4A4 ----------------------------------------------------------------------------------------
def _with_activations(model, fmt):
    """A copy whose every block linear fake-quantizes its input with ``fmt`` (weights stay float)."""
    out = nnx.clone(model)
    for path in out.equivalence_layout().block_linears:
        module_at(out, path).activation = get_format(fmt)
    return out


def test_quarot_reduces_the_w4a4_error():
    model = outlier_model(_config(), 30)
    rotated = quarot(model, jax.random.key(31), online=("down", "qk"))
    tokens = _tokens(32, 4, 16)
    reference = _logits(model, tokens)
    assert _rel(_logits(rotated, tokens), reference) < 1e-4

    def errors(m, fmt):
        out = _logits(_with_activations(m, fmt), tokens, fast=False)
        l2 = np.linalg.norm(out - reference) / np.linalg.norm(reference - reference.mean(-1, keepdims=True))
        return float(l2), float(kl_divergence(out, reference))

    (raw_l2, raw_kl), (rot_l2, rot_kl) = errors(model, "int4-asym"), errors(rotated, "int4-asym")
    assert rot_kl < 0.6 * raw_kl, (raw_kl, rot_kl)
    assert rot_l2 < 0.8 * raw_l2, (raw_l2, rot_l2)
