"""Equivalence transforms folded into a Llama's weights: the folded model computes the original function.

Every case draws a random model (random kernels, biases and non-unit RMSNorm gains) and a random
transform pytree (Haar residual rotation, per-KV-head value/output rotations, positive scales
``exp(0.3 N(0, 1))``), folds it with ``apply_transforms`` and compares logits with the original model
on fresh random tokens: the full forward and the KV-cache path (``model.step`` in chunks).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.models import llama
from jquant.testing.tiny_models import FAST_COMPILE, fast_cached_logits, fast_logits
from jquant.transforms import pad_to_hadamard_size, random_orthogonal, supported_size
from jquant.transforms.equivalence import (
    OnlineRotations,
    apply_transforms,
    check_params,
    fold,
    fold_norms,
    identity_params,
    merge_weights,
    set_online_rotations,
    split_weights,
)

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            qkv_bias=True, out_bias=True, mlp_bias=True)
SEQ = 12
SCALES = ("attn_scale", "mlp_scale", "qk_scale", "ov_scale", "ud_scale")


# ---- helpers -----------------------------------------------------------------------------------------
def _config(dtype="float32", **changes):
    return llama.LlamaConfig(**{**BASE, **changes}, dtype=dtype, param_dtype=dtype)


def _random_model(cfg, seed):
    """A model whose every parameter is random: kernels ~ N(0, 1/in), biases ~ N(0, 0.1²), gains exp(0.3 N)."""
    abstract = llama.abstract_model(cfg)  # shapes only; the values are drawn here with numpy
    rng = np.random.default_rng(seed)
    graphdef, w, rest = split_weights(abstract)
    new = {}
    for path, value in w.items():
        shape, leaf = value.shape, path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif leaf == "bias":
            a = 0.1 * rng.standard_normal(shape)
        elif leaf == "weight":  # RMSNorm gains (also Qwen3's q/k norms)
            a = np.exp(0.3 * rng.standard_normal(shape))
        elif leaf == "embedding":
            a = rng.standard_normal(shape)
        else:
            raise AssertionError(path)
        new[path] = jnp.asarray(a, value.dtype)
    return merge_weights(graphdef, new, rest, abstract)


_orthogonal = jax.jit(random_orthogonal, static_argnums=(0, 2))


def _random_params(layout, seed, dtype, *, scales=SCALES):
    """identity_params(layout) with every rotation Haar-random and every requested scale exp(0.3 N(0, 1))."""
    dtype = jnp.dtype(dtype)  # one spelling, so the jitted random_orthogonal compiles once per dtype
    params = identity_params(layout, dtype=dtype)
    keys = iter(jax.random.split(jax.random.key(seed), 1 + sum(la.attention.num_kv_heads for la in layout.layers)))
    rng = np.random.default_rng(seed)
    params["residual"] = _orthogonal(layout.hidden_size, next(keys), dtype)
    for layer, p in zip(layout.layers, params["layers"]):
        a = layer.attention
        p["ov"] = jnp.stack([_orthogonal(a.head_dim, next(keys), dtype) for _ in range(a.num_kv_heads)])
        for name in list(p):
            if name.endswith("scale"):
                if name in scales:
                    p[name] = jnp.asarray(np.exp(0.3 * rng.standard_normal(p[name].shape)), dtype)
                else:
                    del p[name]
    return params


def _tokens(seed, batch=2, length=SEQ):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)), jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _weights(model):
    return {k: np.asarray(v) for k, v in split_weights(model)[1].items()}



def _check_equivalent(cfg, seed, online, pad, tol):
    model = _random_model(cfg, seed)
    dtype = jnp.dtype(cfg.dtype)
    layout = model.equivalence_layout()
    params = _random_params(layout, seed + 100, dtype)
    before = _weights(model)
    tokens = _tokens(seed + 200)
    ref = fast_logits(model, tokens)
    assert np.asarray(ref).dtype == dtype

    out = apply_transforms(model, params, online=online, pad=pad)

    # the transform is not trivial: embedding, q_proj, v_proj and the head all changed
    after = _weights(out)
    for path in ("embed_tokens/embedding", "layers/0/self_attn/q_proj/kernel", "layers/1/self_attn/v_proj/kernel",
                 "lm_head/kernel"):
        assert _rel(after[path], before[path]) > 1e-2, path
    # the online sites are switched on exactly as asked
    hidden = cfg.intermediate_size
    width = pad_to_hadamard_size(hidden) if "down" in online and not supported_size(hidden) else hidden
    for i, layer in enumerate(out.layers):
        assert layer.mlp.down_proj.input_rotation == (width if "down" in online else None)
        assert layer.self_attn.qk_rotation == ("qk" in online)
        assert after[f"layers/{i}/mlp/down_proj/kernel"].shape == (width, cfg.hidden_size)
        assert after[f"layers/{i}/mlp/down_proj/kernel"].dtype == dtype

    # full forward, and the KV-cache path in two chunks, equal the original model's full forward
    assert _rel(fast_logits(out, tokens), ref) < tol
    assert _rel(fast_cached_logits(out, tokens, (SEQ // 2, SEQ - SEQ // 2))[0], ref) < tol
    # the input model was not modified
    for path, value in _weights(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    for layer in model.layers:
        assert layer.mlp.down_proj.input_rotation is None and not layer.self_attn.qk_rotation
    return out


CASES = [
    (96, (), False),
    (96, ("qk",), False),
    (96, ("down", "qk"), False),
    (176, ("down", "qk"), True),  # 176 = 11 * 16 has no Hadamard: zero-padded to pad_to_hadamard_size(176)
]


# ---- 1, 2: exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden, online, pad", CASES)
def test_exact_in_float64(x64, hidden, online, pad):
    out = _check_equivalent(_config("float64", intermediate_size=hidden), seed=hidden + len(online), online=online,
                            pad=pad, tol=1e-9)
    if pad:  # down_proj grew to the padded Hadamard order
        size = pad_to_hadamard_size(hidden)
        assert not supported_size(hidden) and size > hidden and supported_size(size)
        assert out.layers[0].mlp.down_proj.kernel[...].shape == (size, 64)


@pytest.mark.parametrize("hidden, online, pad", [CASES[3]])
def test_float32_to_single_precision(hidden, online, pad):
    _check_equivalent(_config("float32", intermediate_size=hidden), seed=7 + hidden, online=online, pad=pad, tol=1e-4)


# ---- 3: Qwen3 (q/k RMSNorm) ---------------------------------------------------------------------------
def test_qwen3_qk_norm_exact_without_qk_scale(x64):
    cfg = _config("float64", family="qwen3", qk_norm=True, out_bias=False, qkv_bias=False, mlp_bias=False)
    model = _random_model(cfg, 11)
    layout = model.equivalence_layout()
    assert all(layer.attention.qk_norm for layer in layout.layers)
    assert all("qk_scale" not in p for p in identity_params(layout)["layers"])
    params = _random_params(layout, 12, jnp.float64, scales=("attn_scale", "mlp_scale", "ov_scale", "ud_scale"))
    tokens = _tokens(13)
    ref = fast_logits(model, tokens)
    out = apply_transforms(model, params, online=("down", "qk"))
    assert _rel(fast_logits(out, tokens), ref) < 1e-9
    assert _rel(fast_cached_logits(out, tokens, (6, 6))[0], ref) < 1e-9

    a = layout.layers[1].attention
    params["layers"][1]["qk_scale"] = jnp.full((a.num_kv_heads, a.head_dim // 2), 2.0, jnp.float64)
    with pytest.raises(ValueError, match=r"layer 1 .*qk_norm"):
        check_params(params, layout)
    with pytest.raises(ValueError, match="qk_norm"):
        apply_transforms(model, params)


# ---- 4, 5: the pure fold ------------------------------------------------------------------------------
def _folded_setup(cfg, seed, online):
    model = _random_model(cfg, seed)
    layout = model.equivalence_layout()
    folded = fold_norms(model)
    set_online_rotations(folded, layout, online)
    graphdef, w, rest = split_weights(folded)
    return model, layout, folded, graphdef, w, rest


def test_fold_is_differentiable_and_jittable(x64):
    """jit(grad) of a loss of the merged model's logits: finite, and equal to central finite differences."""
    online = OnlineRotations(down=True, qk=True)
    model, layout, folded, graphdef, w, rest = _folded_setup(_config("float64"), 31, online)
    tokens = _tokens(32, batch=1, length=6)

    def loss(params):
        merged = merge_weights(graphdef, fold(w, params, layout, online), rest, folded)
        return jnp.mean(merged(tokens) ** 2)

    params = _random_params(layout, 33, jnp.float64)
    value_and_grad = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)
    value, grads = value_and_grad(params)
    ref = jnp.mean(fast_logits(model, tokens) ** 2)
    assert abs(float(value) - float(ref)) < 1e-9 * float(ref)  # the traced fold is the same function
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)

    flat, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(34)
    direction = jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(x.shape)) for x in flat])
    eps = 1e-5
    plus = value_and_grad(jax.tree.map(lambda p, d: p + eps * d, params, direction))[0]
    minus = value_and_grad(jax.tree.map(lambda p, d: p - eps * d, params, direction))[0]
    numeric = (float(plus) - float(minus)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(leaves, jax.tree.leaves(direction)))
    assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_identity_params_fold_to_the_input_weights():
    model, layout, _, _, w, _ = _folded_setup(_config(), 41, OnlineRotations())
    for params in (identity_params(layout), {}):
        out = jax.jit(lambda p: fold(w, p, layout))(params)
        assert set(out) == set(w)
        for path, value in w.items():
            np.testing.assert_allclose(np.asarray(out[path]), np.asarray(value), rtol=1e-6, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("hidden, online", [(96, OnlineRotations(down=True, qk=True)),
                                            (176, OnlineRotations(down=True, pad=True))])
def test_numpy_float64_and_jax_folds_agree(x64, hidden, online):
    _, layout, _, _, w, _ = _folded_setup(_config("float64", intermediate_size=hidden), 51, online)
    params = _random_params(layout, 52, jnp.float64)
    host = fold({k: np.asarray(v, np.float64) for k, v in w.items()},
                jax.tree.map(lambda a: np.asarray(a, np.float64), params), layout, online)
    dev = jax.jit(lambda ws, ps: fold(ws, ps, layout, online))(w, params)
    assert set(host) == set(dev) == set(w)
    for path in w:
        assert isinstance(host[path], np.ndarray) and host[path].dtype == np.float64, path
        assert isinstance(dev[path], jax.Array), path
        assert host[path].shape == dev[path].shape, path
        np.testing.assert_allclose(np.asarray(dev[path]), host[path], rtol=1e-11, atol=1e-12, err_msg=path)
    if online.down:
        size = pad_to_hadamard_size(hidden)
        assert host["layers/0/mlp/down_proj/kernel"].shape == (size, 64)


# ---- 6: errors, and the input model left alone --------------------------------------------------------
def test_tied_embeddings_need_untie():
    cfg = _config(tie_embeddings=True)
    tied = _random_model(cfg, 61)
    assert tied.lm_head is None and tied.equivalence_layout().head is None
    params = _random_params(tied.equivalence_layout(), 62, jnp.float32)
    with pytest.raises(ValueError, match=r"untie_embeddings\(\)"):
        apply_transforms(tied, params)
    with pytest.raises(ValueError, match="untie_embeddings"):
        fold_norms(tied)
    untied = tied.untie_embeddings()
    assert untied.lm_head is not None
    tokens = _tokens(63)
    ref = fast_logits(tied, tokens)
    assert _rel(fast_logits(untied, tokens), ref) < 1e-6
    out = apply_transforms(untied, params, online=("down", "qk"))
    assert _rel(fast_logits(out, tokens), ref) < 1e-4


@pytest.fixture(scope="module")
def small():
    model = _random_model(_config(intermediate_size=176), 71)
    return model, model.equivalence_layout()


def test_unsupported_width_without_pad(small):
    model, layout = small
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj: width 176 .*pad=True"):
        apply_transforms(model, {}, online=("down",))
    # the q/k rotation needs no padding (head_dim 16)
    apply_transforms(model, {}, online=("qk",))


def test_wrong_shapes_name_the_layer(small):
    model, layout = small
    bad = identity_params(layout)
    bad["layers"][1]["ov"] = jnp.broadcast_to(jnp.eye(8), (2, 8, 8))
    with pytest.raises(ValueError, match=r"layer 1 \(layers/1/self_attn\).*'ov'.*\(2, 16, 16\).*\(2, 8, 8\)"):
        apply_transforms(model, bad)
    bad = identity_params(layout)
    bad["layers"][0]["ud_scale"] = jnp.ones((96,))
    with pytest.raises(ValueError, match=r"layer 0 \(layers/0/self_attn\).*'ud_scale'.*\(176,\)"):
        apply_transforms(model, bad)
    with pytest.raises(ValueError, match=r"params\['residual'\].*\[64, 64\]"):
        apply_transforms(model, {"residual": jnp.eye(32)})
    with pytest.raises(ValueError, match="2 layers"):
        apply_transforms(model, {"layers": [{}]})
    with pytest.raises(ValueError, match="unknown entries"):
        apply_transforms(model, {"layers": [{}, {"smooth": jnp.ones((64,))}]})


@pytest.mark.parametrize("value", [0.0, -0.5, np.nan, np.inf])
def test_non_positive_or_non_finite_scale(small, value):
    model, layout = small
    bad = identity_params(layout)
    bad["layers"][1]["attn_scale"] = jnp.ones((64,)).at[3].set(value)
    with pytest.raises(ValueError, match=r"layer 1 .*'attn_scale'.*> 0"):
        apply_transforms(model, bad)


def test_online_rotations_apply_once(small):
    model, layout = small
    once = apply_transforms(model, {}, online=("down", "qk"), pad=True)
    with pytest.raises(ValueError, match=r"down_proj already has an online rotation"):
        apply_transforms(once, {}, online=("down",), pad=True)
    with pytest.raises(ValueError, match=r"self_attn already rotates queries and keys"):
        apply_transforms(once, {}, online=("qk",))
    # transforming again without online rotations (and without touching the rotated MLP product) is still exact
    tokens = _tokens(81)
    params = _random_params(layout, 82, jnp.float32, scales=("attn_scale", "mlp_scale", "qk_scale", "ov_scale"))
    again = apply_transforms(once, params)
    assert _rel(fast_logits(again, tokens), fast_logits(model, tokens)) < 1e-4


@pytest.mark.parametrize("hidden", [96, 176])
def test_ud_scale_after_online_down(hidden):
    model = _random_model(_config(intermediate_size=hidden), 85)
    layout = model.equivalence_layout()
    once = apply_transforms(model, {}, online=("down",), pad=True)
    params = identity_params(layout, residual=False, ov=False)
    for p in params["layers"]:
        p["ud_scale"] = jnp.asarray(np.exp(0.3 * np.random.default_rng(86).standard_normal(hidden)), jnp.float32)
    tokens = _tokens(87)
    try:
        again = apply_transforms(once, params)
    except ValueError as err:  # refusing is acceptable if it says why
        assert "online" in str(err) and "down_proj" in str(err)
        return
    assert _rel(fast_logits(again, tokens), fast_logits(model, tokens)) < 1e-4


def test_quantized_model_is_rejected(small):
    model, layout = small
    quantized = jquant.quantize(model, "rtn-w8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        apply_transforms(quantized, identity_params(layout))
    with pytest.raises(ValueError, match="already quantized"):
        fold_norms(quantized)


def test_unknown_online_name(small):
    model, _ = small
    with pytest.raises(ValueError, match=r"unknown.*'down'.*'qk'"):
        apply_transforms(model, {}, online=("up",))
    with pytest.raises(ValueError, match="unknown"):
        OnlineRotations.parse("hadamard")


def test_input_model_is_not_modified(small):
    model, layout = small
    before = _weights(model)
    graph_before = nnx.graphdef(model)
    out = apply_transforms(model, _random_params(layout, 91, jnp.float32), online=("down", "qk"), pad=True)
    assert out is not model
    after = _weights(model)
    assert set(after) == set(before)
    for path, value in after.items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert nnx.graphdef(model) == graph_before
    assert all(layer.mlp.down_proj.input_rotation is None for layer in model.layers)
    assert not any(layer.self_attn.qk_rotation for layer in model.layers)


# ---- 7: fold_norms ------------------------------------------------------------------------------------
def test_fold_norms_sets_gains_to_one_and_keepsfast_logits():
    model = _random_model(_config(), 101)
    before = _weights(model)
    assert not np.allclose(before["layers/0/input_layernorm/weight"], 1.0)
    folded = fold_norms(model)
    w = _weights(folded)
    for group in model.equivalence_layout().norm_groups:
        np.testing.assert_array_equal(w[f"{group.norm}/weight"], np.ones_like(before[f"{group.norm}/weight"]))
        gain = before[f"{group.norm}/weight"]
        for c in group.consumers:
            np.testing.assert_allclose(w[f"{c}/kernel"], gain[:, None] * before[f"{c}/kernel"], rtol=1e-6)
    tokens = _tokens(102)
    assert _rel(fast_logits(folded, tokens), fast_logits(model, tokens)) < 1e-5
    # only the norms and their consumers changed
    changed = {p for p in w if not np.array_equal(w[p], before[p])}
    expected = {f"{g.norm}/weight" for g in model.equivalence_layout().norm_groups}
    expected |= {f"{c}/kernel" for g in model.equivalence_layout().norm_groups for c in g.consumers}
    assert changed == expected
