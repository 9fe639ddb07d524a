"""MambaQuant's SSM-matmul site (a4): the quantized matmul ``y = Q(h H_N) Q(C H_N)``, S4 and R4 (spec §3.5b).

The op is checked against a float64 reference on independently quantized operands; S4 (``W_B / s``, ``W_C · s``) and
R4 (online ``h H_N``, ``W_C H_N``) are exact in float64; the ``-ssm`` recipes quantize the matmul, save and load.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jquant.models import mamba, mamba2

from jquant import ops
from jquant.checkpoint import load, save
from jquant.formats import dequantize, get_format, quantize
from jquant.numerics.hadamard import hadamard_numpy
from jquant.quantization import quantize as quantize_model
from jquant.recipes import Recipe, Rule
from jquant.testing.tiny_models import fast_cached_logits, fast_logits, redrawn_model
from jquant.transforms.equivalence import module_at
from jquant.transforms.mamba_rotation import apply_mamba_transforms, mambaquant_params, ssm_state_statistics

VOCAB = 96
N = 8


def _per_token(x: np.ndarray, fmt) -> np.ndarray:
    """Each row of ``x [B, F]`` quantized and dequantized on its own (one scale per token)."""
    return np.stack([np.asarray(dequantize(quantize(jnp.asarray(row[None]), fmt, axis=-1)))[0] for row in x])


@pytest.mark.parametrize("rotate", [False, True])
def test_ssm_matmul_is_the_product_of_per_token_quantized_operands(rotate):
    rng = np.random.default_rng()
    h = rng.standard_normal((3, 5, N)) * np.r_[1, 1, 1, 25, 1, 1, 1, 1]  # an outlier state
    c = rng.standard_normal((3, N))
    fmt = get_format("int8-asym")
    got = np.asarray(ops.ssm_matmul(jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32), fmt, rotate=rotate))
    hr = h @ hadamard_numpy(N) if rotate else h
    hq = _per_token(hr.reshape(3, -1).astype(np.float32), fmt).reshape(3, 5, N)
    cq = _per_token(c.astype(np.float32), fmt)
    np.testing.assert_allclose(got, np.einsum("bdn,bn->bd", np.float64(hq), np.float64(cq)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(hq, hr, rtol=1e-3)  # the states were quantized
    float_path = ops.ssm_matmul(jnp.asarray(h), jnp.asarray(c @ hadamard_numpy(N) if rotate else c), None, rotate=rotate)
    want = np.einsum("bdn,bn->bd", h, c)  # float32 sums of terms up to |want|.max(): cancellation allowed for
    np.testing.assert_allclose(np.asarray(float_path), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_quantized_scan_without_a_format_is_the_chunked_scan():
    rng = np.random.default_rng()
    b, t, di = 2, 7, 6
    u, delta = rng.standard_normal((b, t, di)), np.abs(rng.standard_normal((b, t, di))) * 0.3
    A, B, C = -np.abs(rng.standard_normal((di, N))), rng.standard_normal((b, t, N)), rng.standard_normal((b, t, N))
    h0 = rng.standard_normal((b, di, N))
    args = [jnp.asarray(x, jnp.float32) for x in (u, delta, A, B, C, h0)]
    y_ref, h_ref = ops.selective_scan(*args, chunk_size=3)  # the chunked form: an independent implementation
    y, h = ops.selective_scan_quantized(*args, fmt=None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-5)
    rotated = [*args[:4], args[4] @ jnp.asarray(hadamard_numpy(N), jnp.float32), args[5]]
    y_rot, _ = ops.selective_scan_quantized(*rotated, fmt=None, rotate=True)
    np.testing.assert_allclose(np.asarray(y_rot), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


def _mamba1(seed=0, dtype="float32"):
    """A Mamba-1 whose C has outlier states (2 C-columns of x_proj x 15)."""
    cfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=N, time_step_rank=4,
                            dtype=dtype, param_dtype=dtype)

    def plant(path, a, rng):
        if path.endswith("x_proj/kernel"):
            a[:, [4 + N + 1, 4 + N + 6]] *= 15.0
        return a

    return redrawn_model(mamba.init_model(cfg, jax.random.key(seed)), seed, plant)


def _tokens(seed, batch=3, length=20):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("parts", ["s4", "r4", "everything"])
def test_s4_and_r4_are_exact_in_float64_for_prefill_and_decode(parts):
    with jax.enable_x64(True):
        model = _mamba1(dtype="float64")
        if parts == "everything":  # with R1/R5 (KLT), S2/S5/S7, the online R2 and both S4 rules' statistics
            params = mambaquant_params(model, _tokens(1), jax.random.key(0), smooth_conv=True, smooth_state=True,
                                       state_rule="balanced")
        else:
            params = mambaquant_params(model, _tokens(1), jax.random.key(0), smooth=False, rotate=False,
                                       smooth_state=parts == "s4")
        if parts == "s4":
            assert [set(p) for p in params["blocks"]] == [{"state_scale"}] * 2
            s = params["blocks"][0]["state_scale"]
            assert s.shape == (N,) and sorted(np.argsort(s)[-2:].tolist()) == [1, 6]  # the planted C states, largest
        out = apply_mamba_transforms(model, params, online=parts == "everything", rotate_state=parts != "s4")
        assert all(module_at(out, f"layers/{i}/mixer").state_rotation == (parts != "s4") for i in range(2))
        tokens = jnp.asarray(_tokens(2))
        ref = np.asarray(fast_logits(model, tokens))
        np.testing.assert_allclose(np.asarray(fast_logits(out, tokens)), ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.asarray(fast_cached_logits(out, tokens, (12, 1, 7))[0]), ref, rtol=1e-9,
                                   atol=1e-9)
        if parts == "r4":
            with pytest.raises(ValueError, match="already rotates its states"):
                apply_mamba_transforms(out, {}, rotate_state=True)


def _ssm_only_error(model, reference, tokens) -> float:
    """Logits MSE against ``reference`` with only the SSM matmuls quantized (int8 per token)."""
    probe = nnx.clone(model)
    for i in range(2):
        module_at(probe, f"layers/{i}/mixer").ssm_matmul = get_format("int8-asym")
    return float(np.mean((np.asarray(fast_logits(probe, tokens)) - np.asarray(fast_logits(reference, tokens))) ** 2))


def test_r4_lowers_the_ssm_matmul_error_on_outlier_states_and_s4_is_reported():
    model = _mamba1()
    tokens = jnp.asarray(_tokens(3, batch=4, length=24))
    plain = _ssm_only_error(model, model, tokens)
    r4 = _ssm_only_error(apply_mamba_transforms(model, {}, rotate_state=True), model, tokens)
    errors = {}
    for rule in ("code", "balanced"):
        params = mambaquant_params(model, _tokens(1), jax.random.key(0), smooth=False, rotate=False,
                                   smooth_state=True, state_rule=rule)
        errors[rule] = _ssm_only_error(apply_mamba_transforms(model, params, rotate_state=True), model, tokens)
    assert plain > 0 and r4 < plain, (plain, r4)
    assert errors["balanced"] < errors["code"]  # the choice of mambaquant-*-ssm (module docstring)
    print(f"SSM-matmul-only logits MSE: plain {plain:.3e}, R4 {r4:.3e}, S4 (code's rule) + R4 {errors['code']:.3e}, "
          f"S4 (balanced) + R4 {errors['balanced']:.3e}")


def test_state_statistics_are_the_maxima_of_the_scan():
    model = _mamba1()
    tokens = _tokens(6, batch=2, length=10)
    stats = ssm_state_statistics(model, tokens, batch_size=1)
    assert set(stats) == {"layers/0/mixer", "layers/1/mixer"}
    h_max, c_max = stats["layers/0/mixer"]
    # layer 0 by hand: the recurrent scan's states and C of the same inputs
    mixer = module_at(model, "layers/0/mixer")
    x = model.layers[0].norm(model.embed_tokens(jnp.asarray(tokens), jnp.float32))
    u, _ = jnp.split(mixer.in_proj(x), 2, axis=-1)
    u = jax.nn.silu(mixer.conv1d(u, mixer.initial_state(2).conv)[0])
    low, B, C = jnp.split(mixer.x_proj(u), [4, 4 + N], axis=-1)
    delta = jax.nn.softplus(mixer.dt_proj(low))
    A = -jnp.exp(mixer.A_log[...])
    h = np.zeros((2, u.shape[-1], N))
    peak = np.zeros(N)
    for t in range(10):
        h = np.exp(np.asarray(delta[:, t, :, None] * A)) * h + np.asarray((delta[:, t] * u[:, t])[..., None] * B[:, t, None])
        peak = np.maximum(peak, np.abs(h).max(axis=(0, 1)))
    np.testing.assert_allclose(h_max, peak, rtol=1e-5)
    np.testing.assert_allclose(c_max, np.abs(np.asarray(C)).max(axis=(0, 1)), rtol=1e-6)


@pytest.mark.parametrize("name", ["rtn-mamba-w8a8-ssm", "mambaquant-w8a8-ssm"])
def test_ssm_recipes_quantize_the_matmul_and_round_trip(name, tmp_path):
    model = _mamba1()
    calib = _tokens(4, batch=4, length=16)
    q = quantize_model(model, name, calib, progress=False)
    mixers = [module_at(q, f"layers/{i}/mixer") for i in range(2)]
    assert all(m.ssm_matmul == get_format("int8-asym") for m in mixers)
    assert all(m.state_rotation == name.startswith("mambaquant") for m in mixers)
    tokens = jnp.asarray(_tokens(5))
    logits = np.asarray(fast_logits(q, tokens))
    save(q, tmp_path / "q")
    restored = load(tmp_path / "q")
    assert all(module_at(restored, f"layers/{i}/mixer").ssm_matmul == get_format("int8-asym") for i in range(2))
    np.testing.assert_array_equal(np.asarray(fast_logits(restored, tokens)), logits)


def test_ssm_matmul_needs_mamba1_mixers():
    cfg = mamba2.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_layers=1, state_size=8, num_heads=4, head_dim=16,
                              chunk_size=8)
    model = mamba2.init_model(cfg, jax.random.key(0))
    recipe = Recipe(name="ssm-on-mamba2", rules=(Rule(pattern=".*", weight="int8"),), ssm_matmul="int8-asym")
    with pytest.raises(ValueError, match="ssm_matmul quantizes the SSM matmul of Mamba-1 mixers"):
        quantize_model(model, recipe, progress=False)
    with pytest.raises(ValueError, match="ssm_matmul must be a format name"):
        Recipe(name="bad", rules=(Rule(pattern=".*", weight="int8"),), ssm_matmul=8)
