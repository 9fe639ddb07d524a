"""jquant.ops.conv against torch.nn.functional.conv1d/2d/3d on fresh random inputs (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jquant as jq
from jquant import ops
from jquant.algorithms.weights import algorithm
from jquant.calib.capture import capture_statistics, set_capture
from jquant.formats import QArray, dequantize, fake_quantize, get_format, quantize
from jquant.models.layers import Conv
from jquant.quantization import plan
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _case(rng, spatial, c_in, c_out, kernel, groups=1):
    x = rng.standard_normal((2, *spatial, c_in)).astype(np.float32)
    w = (rng.standard_normal((c_out, c_in // groups, *kernel)) / np.sqrt(c_in * np.prod(kernel))).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    return x, w, b


def _torch(x, w, b, **kw):
    """``x`` channels last through torch's channels-first convolution, back to channels last."""
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    y = TORCH_CONV[x.ndim - 2](xt, torch.from_numpy(w), None if b is None else torch.from_numpy(b), **kw)
    return np.moveaxis(y.numpy(), 1, -1)


CASES = [  # spatial, c_in, c_out, kernel, stride, padding, dilation, groups
    ((11,), 4, 6, (3,), 1, 1, 1, 1),
    ((13,), 6, 4, (4,), 2, 2, 2, 2),
    ((9, 8), 3, 5, (3, 2), (2, 1), ((1, 0), 1), 1, 1),
    ((7, 9), 4, 8, (3, 3), 1, 0, (2, 1), 4),
    ((5, 6, 7), 2, 4, (3, 2, 3), (1, 2, 2), ((1, 1), 2, 0), 1, 1),
    ((6, 5, 5), 4, 4, (2, 3, 3), 1, "same", (2, 1, 1), 2),
]


@pytest.mark.parametrize("spatial, c_in, c_out, kernel, stride, padding, dilation, groups", CASES)
def test_conv_matches_torch(spatial, c_in, c_out, kernel, stride, padding, dilation, groups):
    rng = np.random.default_rng(len(spatial) * 100 + c_in * 10 + groups)
    x, w, b = _case(rng, spatial, c_in, c_out, kernel, groups)
    got = ops.conv(jnp.asarray(x), ops.conv_weight_matrix(w), jnp.asarray(b), kernel_size=kernel, stride=stride,
                   padding=padding, dilation=dilation, groups=groups)
    if padding == "same":
        want = _torch(x, w, b, stride=stride, padding="same", dilation=dilation, groups=groups)
    else:  # explicit (before, after) pads applied with numpy, torch convolving without padding
        entries = (padding,) * len(spatial) if isinstance(padding, int) else padding
        pairs = [(p, p) if isinstance(p, int) else p for p in entries]
        want = _torch(np.pad(x, ((0, 0), *pairs, (0, 0))), w, b, stride=stride, dilation=dilation, groups=groups)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial, kernel, stride, padding, dilation", [
    ((12,), (3,), 2, 1, 2),
    ((8, 7), (3, 2), (1, 2), ((2, 1), (0, 1)), (1, 2)),
    ((5, 6, 6), (2, 3, 3), (1, 2, 1), "causal", (1, 1, 2)),
    ((9,), (4,), 1, "causal", 3),
    ((4, 5, 5), (3, 3, 3), 1, "causal", 1),
])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_patches_times_matrix_is_the_convolution(spatial, kernel, stride, padding, dilation, padding_mode):
    rng = np.random.default_rng(7 + len(spatial))
    x, w, _ = _case(rng, spatial, 3, 5, kernel)
    matrix = ops.conv_weight_matrix(w)
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    patches = ops.conv_patches(jnp.asarray(x), **kw)
    assert patches.shape[-1] == np.prod(kernel) * 3
    got = np.einsum("...r,ro->...o", np.asarray(patches, np.float64), np.asarray(matrix, np.float64))
    np.testing.assert_allclose(got, np.asarray(ops.conv(jnp.asarray(x), matrix, **kw)), rtol=1e-5, atol=1e-5)


def test_causal_1d_and_replicate_causal_3d_match_torch():
    rng = np.random.default_rng(3)
    x, w, b = _case(rng, (10,), 4, 4, (3,))
    got = ops.conv(jnp.asarray(x), ops.conv_weight_matrix(w), jnp.asarray(b), kernel_size=3, dilation=2,
                   padding="causal")
    want = _torch(np.pad(x, ((0, 0), (4, 0), (0, 0))), w, b, dilation=2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    y_past = np.asarray(ops.conv(jnp.asarray(x[:, :6]), ops.conv_weight_matrix(w), kernel_size=3, dilation=2,
                                 padding="causal"))
    np.testing.assert_allclose(y_past, np.asarray(got)[:, :6] - b, rtol=1e-5, atol=1e-5)  # no look-ahead

    x, w, b = _case(rng, (5, 6, 6), 3, 4, (3, 3, 3))  # HunyuanVideo's CausalConv3d: replicate pad, time before only
    got = ops.conv(jnp.asarray(x), ops.conv_weight_matrix(w), jnp.asarray(b), kernel_size=3, padding="causal",
                   padding_mode="replicate")
    xt = F.pad(torch.from_numpy(np.moveaxis(x, -1, 1)), (1, 1, 1, 1, 2, 0), mode="replicate")
    want = np.moveaxis(F.conv3d(xt, torch.from_numpy(w), torch.from_numpy(b)).numpy(), 1, -1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_quantized_weight_equals_the_dequantized_float_path_and_is_recorded():
    rng = np.random.default_rng(5)
    x, w, b = _case(rng, (6, 7), 4, 8, (3, 3))
    q = quantize(ops.conv_weight_matrix(w), get_format("int8"), axis=0)
    kw = dict(kernel_size=3, stride=(2, 1), padding=1)
    with ops.record_dispatch() as records:
        got = ops.conv(jnp.asarray(x), q, jnp.asarray(b), **kw)
    want = ops.conv(jnp.asarray(x), dequantize(q, jnp.float32), jnp.asarray(b), **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert [(r.op, r.path, r.w_shape) for r in records] == [("conv", ops.dispatch.XLA_PATH, (36, 8))]
    # independent reference: torch's convolution with the dequantized kernel back in torch's [C_out, C_in, *k] layout,
    # each entry within half an int8 step (per output channel, symmetric: absmax / 127) of the float kernel
    deq = np.moveaxis(np.asarray(dequantize(q, jnp.float32)).reshape(3, 3, 4, 8), (-1, -2), (0, 1))
    step = np.abs(w).reshape(8, -1).max(1) / 127
    assert np.all(np.abs(deq - w).reshape(8, -1).max(1) <= step / 2 * (1 + 1e-5))
    np.testing.assert_allclose(np.asarray(got), _torch(x, deq, b, stride=(2, 1), padding=1), rtol=1e-5, atol=1e-5)


def test_activation_format_quantizes_per_position_along_channels():
    rng = np.random.default_rng(6)
    x, w, _ = _case(rng, (9,), 8, 4, (3,))
    fmt = get_format("int8")
    got = ops.conv(jnp.asarray(x), ops.conv_weight_matrix(w), kernel_size=3, padding=1, activation=fmt)
    xq = np.asarray(dequantize(quantize(jnp.asarray(x), fmt, axis=-1), jnp.float32))
    np.testing.assert_allclose(np.asarray(got), _torch(xq, w, None, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=(3, 3)), r"kernel_size=\(3, 3\) must be a positive int or 1"),
    (dict(kernel_size=3, padding="full"), "padding='full'"),
    (dict(kernel_size=3, padding="same", stride=2), "padding='same' needs stride 1"),
    (dict(kernel_size=3, groups=3), "groups=3 must be a positive int dividing the 4 input channels"),
    (dict(kernel_size=2), r"not the matrix view \[K C_in / groups, C_out\]"),
    (dict(kernel_size=3, dilation=5), "smaller than the dilated kernel"),
    (dict(kernel_size=3, padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    x = jnp.ones((1, 8, 4))
    with pytest.raises(ValueError, match=match):
        ops.conv(x, jnp.ones((12, 2)), **kwargs)


class _TinyVAE(nnx.Module):
    """Two Conv sites and no calibration blocks: enough for RTN recipes and for capturing statistics."""

    def __init__(self, c_in: int, rngs: nnx.Rngs):
        self.conv_in = Conv(c_in, 32, (3, 3), padding=1, use_bias=True, param_dtype=jnp.float32, rngs=rngs,
                            init_std=0.2)
        self.down = Conv(32, 16, (2, 2), stride=2, use_bias=False, param_dtype=jnp.float32, rngs=rngs, init_std=0.2)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.conv_in(x)))


def test_conv_layer_is_a_site_and_matches_torch():
    model = _TinyVAE(4, nnx.Rngs(0))
    assert [(s.path, s.spec.kind) for s in find_sites(model)] == [("conv_in", "conv"), ("down", "conv")]
    x = np.random.default_rng(8).standard_normal((2, 6, 6, 4)).astype(np.float32)
    torch_w = np.asarray(model.conv_in.kernel[...]).reshape(3, 3, 4, 32).transpose(3, 2, 0, 1)
    np.testing.assert_allclose(np.asarray(model.conv_in(jnp.asarray(x))),
                               _torch(x, np.ascontiguousarray(torch_w), np.zeros(32, np.float32), padding=1),
                               rtol=1e-5, atol=1e-5)


def test_rtn_recipe_quantizes_conv_sites():
    model = _TinyVAE(4, nnx.Rngs(1))
    q = jq.quantize(model, "rtn-w8", progress=False)
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6, 6, 4)), jnp.float32)
    for path in ("conv_in", "down"):
        kernel = getattr(q, path).kernel.get_value()
        assert isinstance(kernel, QArray) and kernel.format.name == "int8"
        want = quantize(getattr(model, path).kernel.get_value(), get_format("int8"), axis=0)
        np.testing.assert_array_equal(np.asarray(dequantize(kernel)), np.asarray(dequantize(want)))
    y, y_float = np.asarray(q(x)), np.asarray(model(x))
    assert 0 < np.abs(y - y_float).max() < 0.02 * np.abs(y_float).max()


def test_gptq_on_captured_patch_statistics_beats_rtn():
    model = _TinyVAE(32, nnx.Rngs(2))
    site = model.conv_in  # 3 x 3 x 32 = 288 rows: int4-g32 groups are one kernel tap's 32 channels
    x = jnp.asarray(np.random.default_rng(10).standard_normal((6, 8, 8, 32)) * np.linspace(0.2, 3, 32), jnp.float32)
    set_capture(model, True)
    _, stats = capture_statistics(lambda m, inputs: m(inputs))(model, x)
    set_capture(model, False)
    patches = np.asarray(ops.conv_patches(x, kernel_size=(3, 3), padding=1), np.float64).reshape(-1, 288)
    np.testing.assert_allclose(stats["conv_in"].hessian, patches.T @ patches, rtol=1e-5, atol=1e-3)
    assert stats["conv_in"].count == patches.shape[0]
    weight, fmt = site.kernel.get_value(), get_format("int4-g32")
    gptq = algorithm("gptq").quantize(weight, fmt, axis=0, stats=stats["conv_in"], options={})
    rtn = algorithm("rtn").quantize(weight, fmt, axis=0)

    def error(q):
        return np.linalg.norm(patches @ (np.asarray(dequantize(q), np.float64) - np.asarray(weight, np.float64)))

    assert error(gptq) < 0.9 * error(rtn)


def test_plan_names_a_conv_site_whose_rows_the_group_size_does_not_divide():
    model = _TinyVAE(3, nnx.Rngs(3))  # conv_in has 3 x 3 x 3 = 27 rows
    recipe = Recipe(name="w4", rules=(Rule(pattern=".*", weight="int4-g32", algorithm="gptq"),))
    with pytest.raises(ValueError, match=r"site 'conv_in' \(weight shape \(27, 32\), axis 0\).*does not divide.*Fix"):
        plan(model, recipe)


def test_activation_formats_apply_to_conv_sites_over_their_input_channels():
    model = _TinyVAE(4, nnx.Rngs(2))
    recipe = Recipe(name="conv-w8a8", rules=(Rule(pattern=".*", weight="int8", activation="int8"),))
    q = jq.quantize(model, recipe, progress=False)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((2, 6, 6, 4)), jnp.float32)
    act = get_format("int8")
    h = ops.conv(fake_quantize(x, act, axis=-1), dequantize(q.conv_in.kernel.get_value()), q.conv_in.bias.get_value(),
             kernel_size=(3, 3), padding=1)
    want = ops.conv(fake_quantize(jax.nn.silu(h), act, axis=-1), dequantize(q.down.kernel.get_value()),
                kernel_size=(2, 2), stride=2)
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    # groups of 128 tile the 128 rows of down's matrix view, but its inputs have 32 channels: refused by name
    wide = Recipe(name="g128", rules=(Rule(pattern="down", activation="int8-g128"),))
    with pytest.raises(ValueError, match=r"site 'down': activation format int8-g128 cannot quantize its 32 input"):
        jq.quantize(model, wide, progress=False)
