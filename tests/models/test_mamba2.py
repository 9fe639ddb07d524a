"""jquant's Mamba-2 family: chunked SSD vs recurrence, decoding state, and the shared family suite (parity
with ``Mamba2ForCausalLM``, checkpoint round trips, decode consistency).

The parity models are tiny random transformers models with every tensor
perturbed (A_log, D, dt_bias, the gated norm and block norms included), written
with ``save_pretrained`` and read back with ``mamba2.from_hf``. T = 20 with
chunk size 8 exercises several chunks and a padded last one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import ops
from jquant.ops.ssm import segment_sum
from jquant.models import hf_io, mamba2
from jquant.recipes import Recipe, Rule
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_greedy_tokens, torch_reference_logits
from jquant.testing.hf_reference import copy_with_config, relative_error, torch_logits, torch_ssm_decode_logits
from jquant.testing.tiny_models import fast_cached_logits, fast_logits

FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-6
BFLOAT16_TOLERANCE = 5e-2
VOCAB = 96
# name -> Mamba2Config overrides (transformers): 2 groups of B/C shared by 4 heads each, untied; and one
# group, a tied head, in/out biases, no conv bias and a residual kept in the compute dtype.
CASES = {
    "groups": dict(n_groups=2),
    "tied-bias": dict(n_groups=1, tie_word_embeddings=True, use_bias=True, use_conv_bias=False, residual_in_fp32=False),
}


TINY = mamba2.Mamba2Config(vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=4, n_groups=2,
                           num_layers=2, chunk_size=5)


def build_hf_mamba2(folder, overrides: dict, *, seed: int = 0, scale: float = 0.2):
    """A perturbed tiny ``Mamba2ForCausalLM`` saved to ``folder``; returns the torch model in eval mode."""
    import torch
    import transformers

    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, expand=2, num_heads=8, head_dim=8, state_size=8,
                                    num_hidden_layers=2, chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    **overrides)
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _tokens(seed: int, batch: int = 2, length: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length)).astype(np.int32)


def _decode(model, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of ``tokens`` fed as one ``prefill`` chunk, then one token per jitted ``step``."""
    chunks = (prefill,) + (1,) * (tokens.shape[1] - prefill)
    return np.asarray(fast_cached_logits(model, jnp.asarray(tokens), chunks)[0])


# ----------------------------------------------------------------------------
# Without transformers
# ----------------------------------------------------------------------------


def _ssd_inputs(seed: int, b=2, t=11, h=4, p=3, g=2, n=5):
    """``x, dt, A, B, C, s0`` for ``ssd_chunked`` (numpy draws: eager JAX draws compile per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    dt = np.log1p(np.exp(normal(b, t, h)))
    A = -np.exp(0.5 * normal(h))
    return normal(b, t, h, p), dt, A, normal(b, t, g, n), normal(b, t, g, n), normal(b, h, p, n)


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_chunked_ssd_equals_recurrence(chunk_size):
    args = _ssd_inputs(0)
    y_ref, s_ref = jax.jit(ops.ssd_recurrent)(*args)
    y, s = jax.jit(ops.ssd_chunked, static_argnames="chunk_size")(*args, chunk_size=chunk_size)
    assert relative_error(y, y_ref) < 1e-6 and relative_error(s, s_ref) < 1e-6


def test_ssd_recurrence_matches_explicit_loop():
    x, dt, A, B, C, s = (np.asarray(a, np.float64) for a in _ssd_inputs(1, t=4))
    group = np.arange(x.shape[2]) // (x.shape[2] // B.shape[2])  # head h reads group h // (H / G)
    ys = []
    for t in range(x.shape[1]):
        s = (np.exp(dt[:, t] * A)[..., None, None] * s
             + np.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t][:, group]))
        ys.append(np.einsum("bhpn,bhn->bhp", s, C[:, t][:, group]))
    y, s_last = ops.ssd_recurrent(*_ssd_inputs(1, t=4))
    assert relative_error(y, np.stack(ys, axis=1)) < 1e-6 and relative_error(s_last, s) < 1e-6


def test_segment_sum():
    a = jnp.array([1.0, 2.0, 4.0])
    expected = np.array([[0, -np.inf, -np.inf], [2, 0, -np.inf], [6, 4, 0]])
    np.testing.assert_array_equal(segment_sum(a), expected)


def test_gated_norm_normalises_each_group_after_the_gate():
    norm = mamba2.GatedRMSNorm(6, 2, eps=0.0, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    y, z = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)
    g = (y * z / (1 + np.exp(-z))).reshape(3, 2, 3)
    expected = (g / np.sqrt(np.mean(g**2, axis=-1, keepdims=True))).reshape(3, 6)
    np.testing.assert_allclose(norm(y, z), expected, rtol=1e-5)


@pytest.fixture(scope="module")
def random_model():
    return mamba2.init_model(TINY, jax.random.key(0))


def test_jit_decode_step(random_model):
    """One jitted decode step equals the eager one, and the cache keeps its pytree structure (a valid scan carry)."""
    graphdef, state = nnx.split(random_model)
    tokens = _tokens(1, length=1)
    cache = random_model.init_cache(2)
    step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state).step(tokens, cache))
    logits, new = step(state, tokens, cache)
    eager_logits, eager_new = random_model.step(tokens, cache)
    assert relative_error(logits, eager_logits) < FLOAT32_TOLERANCE
    assert jax.tree.structure(new) == jax.tree.structure(cache) and int(new.length) == 1
    assert [a.shape for a in jax.tree.leaves(new)] == [a.shape for a in jax.tree.leaves(cache)]
    assert new.layers[0].ssm.shape == (2, 4, 8, 4) and new.layers[0].conv.shape == (2, 3, 32 + 2 * 2 * 4)
    assert relative_error(new.layers[1].ssm, eager_new.layers[1].ssm) < FLOAT32_TOLERANCE


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads \\* head_dim = 24 must equal expand \\* hidden_size = 32"):
        mamba2.Mamba2Config(vocab_size=8, hidden_size=16, num_heads=3, head_dim=8, num_layers=1)
    with pytest.raises(ValueError, match="n_groups=3 must divide num_heads=4"):
        mamba2.Mamba2Config(vocab_size=8, hidden_size=16, num_heads=4, head_dim=8, n_groups=3, num_layers=1)
    with pytest.raises(ValueError, match="time_step_limit"):
        mamba2.Mamba2Config(vocab_size=8, hidden_size=16, num_heads=4, head_dim=8, num_layers=1,
                            time_step_limit=(0.1, 0.01))


# ----------------------------------------------------------------------------
# Parity with transformers (one transformers import for the whole file)
# ----------------------------------------------------------------------------


def _build(case: str, folder, seed: int):
    pytest.importorskip("transformers")
    return build_hf_mamba2(folder, CASES[case], seed=seed)


class TestMamba2Family(FamilySuite):
    spec = FamilySpec(
        family=mamba2.FAMILY,
        tiny_config=TINY,
        vocab_size=VOCAB,
        first_token=3,
        cases=tuple(sorted(CASES)),
        build_reference=_build,
        reference_logits=torch_reference_logits,  # float64: transformers casts Mamba logits to float32 (~2e-7)
        reference_generate=torch_greedy_tokens,
        parity_shape=(2, 20),
        decode_prefill=5,
        float32_tolerance=FLOAT32_TOLERANCE,
        float64_tolerance=FLOAT64_TOLERANCE,
        # per-channel int4 by GPTQ (no clip search, to stay fast) and int8 on every site
        save_recipes=("rtn-w8", Recipe(name="gptq-w4", rules=(Rule(pattern=r".*", weight="int4", algorithm="gptq"),))),
    )

    def test_one_chunk_matches_transformers(self, reference):
        """The checkpoint's chunk size is 8 (T = 20: several chunks, a padded last one); 256 holds the whole sequence."""
        case, hf, folder = reference
        model = mamba2.from_hf(folder)
        assert model.config.chunk_size == 8
        model = mamba2.from_tensors(model.config.replace(chunk_size=256), hf_io.read_safetensors(folder))
        tokens = _tokens(1)
        assert relative_error(fast_logits(model, tokens), torch_logits(hf, tokens)) < FLOAT32_TOLERANCE, case

    def test_decode_matches_transformers_cached_decode(self, reference):
        case, hf, folder = reference
        tokens = _tokens(2)
        ours = _decode(mamba2.from_hf(folder), tokens, prefill=5)
        assert relative_error(ours, torch_ssm_decode_logits(hf, tokens, prefill=5)) < FLOAT32_TOLERANCE, case

    def test_bfloat16_compute(self, reference):
        """bfloat16 activations (float32 weights as stored); scan state and residual stay float32."""
        case, hf, folder = reference
        model = mamba2.from_hf(folder, dtype="bfloat16")
        tokens = _tokens(6)
        ref = torch_logits(hf, tokens)
        full = fast_logits(model, tokens)
        assert full.dtype == jnp.bfloat16 and relative_error(full, ref) < BFLOAT16_TOLERANCE, case
        decoded, cache = fast_cached_logits(model, jnp.asarray(tokens), (4,) + (1,) * 16)
        assert relative_error(decoded, ref) < BFLOAT16_TOLERANCE, case
        assert cache.layers[0].ssm.dtype == jnp.float32 and cache.layers[0].conv.dtype == jnp.bfloat16

    def test_time_step_limit_clips_dt(self, reference):
        """A tight ``time_step_limit`` changes the output, identically in the full-sequence and recurrent forms.

        (transformers clips only in its chunked form, so this is checked within jquant.)
        """
        _, _, folder = reference
        model = mamba2.from_hf(folder)
        clipped = mamba2.from_tensors(model.config.replace(time_step_limit=(0.0, 0.05)), hf_io.read_safetensors(folder))
        tokens = _tokens(4, length=12)
        full = fast_logits(clipped, tokens)
        assert relative_error(full, fast_logits(model, tokens)) > 1e-3
        assert relative_error(_decode(clipped, tokens, prefill=3), full) < FLOAT32_TOLERANCE

    def test_import_keeps_structure(self, reference):
        case, hf, folder = reference
        model = mamba2.from_hf(folder)
        cfg = model.config
        assert cfg.tie_embeddings == (case == "tied-bias") and (model.lm_head is None) == cfg.tie_embeddings
        assert cfg.n_groups == hf.config.n_groups and cfg.time_step_limit == (0.0, math.inf)
        mixer = model.layers[1].mixer
        assert (mixer.conv1d.bias is None) == (not hf.config.use_conv_bias)
        np.testing.assert_array_equal(mixer.dt_bias[...], hf.backbone.layers[1].mixer.dt_bias.detach().numpy())

    def test_rejects_unhandled_config_attributes(self, reference, tmp_path):
        _, _, folder = reference
        with pytest.raises(ValueError, match="norm_before_gate=True"):
            mamba2.from_hf(copy_with_config(folder, tmp_path / "gate", norm_before_gate=True))
        with pytest.raises(ValueError, match=r"does not handle: \['num_mlp_heads'\]"):
            mamba2.from_hf(copy_with_config(folder, tmp_path / "unknown", num_mlp_heads=2))
        with pytest.raises(ValueError, match="num_heads \\* head_dim"):
            mamba2.from_hf(copy_with_config(folder, tmp_path / "heads", num_heads=4))

    def test_rejects_bad_tensors(self, reference):
        _, _, folder = reference
        tensors = hf_io.read_safetensors(folder)
        cfg = mamba2.from_hf(folder).config
        name = "backbone.layers.0.mixer.norm.weight"
        with pytest.raises(ValueError, match=f"{name}' is missing"):
            mamba2.from_tensors(cfg, {k: v for k, v in tensors.items() if k != name})
        with pytest.raises(ValueError, match=r"dt_bias' has shape \(4,\), but the config implies \(8,\)"):
            mamba2.from_tensors(cfg, {**tensors, "backbone.layers.1.mixer.dt_bias": np.zeros(4, np.float32)})


# ----------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------


def test_rejects_a_mamba1_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    import transformers

    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='mamba'.*expects model_type='mamba2' \(Mamba2ForCausalLM\).*mamba\.from_hf"):
        mamba2.from_hf(tmp_path)
