"""jquant's Mamba-1 family: scan forms, decoding state, and the shared family suite (parity with
transformers' ``MambaForCausalLM``, checkpoint round trips, decode consistency).

The parity models are tiny random transformers models with every tensor
perturbed (A_log, D, dt bias and norm weights included), written with
``save_pretrained`` and read back with ``mamba.from_hf``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import ops
from jquant.calib.sequential import walk_blocks
from jquant.models import hf_io, mamba
from jquant.recipes import Recipe, Rule
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_greedy_tokens, torch_reference_logits
from jquant.testing.hf_reference import copy_with_config, relative_error, torch_logits, torch_ssm_decode_logits
from jquant.testing.tiny_models import fast_cached_logits, fast_logits

FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-6
BFLOAT16_TOLERANCE = 5e-2
VOCAB = 96
# name -> MambaConfig overrides (transformers): the default tied model, and one with biases,
# no conv bias, an odd time-step rank, an untied head and a residual kept in the compute dtype.
CASES = {
    "tied": dict(),
    "untied-bias": dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False, time_step_rank=3,
                        residual_in_fp32=False, conv_kernel=3),
}


TINY = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_layers=2, scan_chunk_size=5,
                         tie_embeddings=False)


def build_hf_mamba(folder, overrides: dict, *, seed: int = 0, scale: float = 0.2):
    """A perturbed tiny ``MambaForCausalLM`` saved to ``folder``; returns the torch model in eval mode."""
    import torch
    import transformers

    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(cfg).eval()
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


def _scan_inputs(seed: int, b=2, t=13, di=6, n=4):
    """``u, delta, A, B, C, h0`` for ``selective_scan`` (numpy draws: eager JAX draws compile per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    delta = np.log1p(np.exp(normal(b, t, di)))
    A = -np.exp(0.5 * normal(di, n))
    return normal(b, t, di), delta, A, normal(b, t, n), normal(b, t, n), normal(b, di, n)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_selective_scan_equals_recurrence(chunk_size, parallel):
    args = _scan_inputs(0)
    y_ref, h_ref = jax.jit(ops.selective_scan_recurrent)(*args)
    scan = jax.jit(ops.selective_scan, static_argnames=("chunk_size", "parallel"))
    y, h = scan(*args, chunk_size=chunk_size, parallel=parallel)
    assert relative_error(y, y_ref) < 1e-6 and relative_error(h, h_ref) < 1e-6


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 13, 32])
def test_selective_scan_gradient_equals_autodiff_of_the_recurrence(chunk_size, parallel):
    """The hand-written VJP (chunk recomputation + backward adjoint scan) against autodiff, float64."""
    with jax.enable_x64(True):
        args = tuple(np.asarray(a, np.float64) for a in _scan_inputs(2))
        rng = np.random.default_rng(3)
        y_weight, h_weight = rng.standard_normal(args[0].shape), rng.standard_normal(args[5].shape)

        def loss(scan):
            return lambda *a: jnp.sum(scan(*a)[0] * y_weight) + jnp.sum(scan(*a)[1] * h_weight)

        ref = jax.grad(loss(ops.selective_scan_recurrent), argnums=tuple(range(6)))(*args)
        got = jax.grad(loss(lambda *a: ops.selective_scan(*a, chunk_size=chunk_size, parallel=parallel)),
                       argnums=tuple(range(6)))(*args)
    for name, g, r in zip(("u", "delta", "A", "B", "C", "h0"), got, ref):
        assert relative_error(g, r) < 1e-12, name


def test_selective_scan_matches_explicit_loop():
    u, delta, A, B, C, h = (np.asarray(a, np.float64) for a in _scan_inputs(1, t=5))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
    y, h_last = ops.selective_scan(*_scan_inputs(1, t=5), chunk_size=2)
    assert relative_error(y, np.stack(ys, axis=1)) < 1e-6 and relative_error(h_last, h) < 1e-6


def test_causal_conv1d_in_pieces_equals_whole():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 9, 5), (4, 5), (5,)))
    whole, _ = ops.causal_conv1d(x, w, b, jnp.zeros((2, 3, 5)))
    first, state = ops.causal_conv1d(x[:, :4], w, b, jnp.zeros((2, 3, 5)))
    second, _ = ops.causal_conv1d(x[:, 4:], w, b, state)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-6, atol=1e-6)
    expected = b + sum(w[k] * x[:, 8 - 3 + k] for k in range(4))  # y_8 = b + sum_k w[k] x_{8-K+1+k}
    np.testing.assert_allclose(whole[:, 8], expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def random_model():
    return mamba.init_model(TINY, jax.random.key(0))


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
    assert relative_error(new.layers[1].ssm, eager_new.layers[1].ssm) < FLOAT32_TOLERANCE


def test_block_calibration_sees_every_mixer_linear(random_model):
    """Block-by-block calibration (GPTQ's driver) records the inputs of in_proj, conv1d, x_proj, dt_proj and
    out_proj."""
    seen = {}

    def process_block(visit):
        seen.update({f"{visit.path}/{site}": (s.hessian.shape, s.count) for site, s in visit.stats.items()})

    walk_blocks(random_model, _tokens(7, batch=3, length=6), process_block, batch_size=2, progress=False)
    di, rank = random_model.config.intermediate_size, random_model.config.time_step_rank
    sizes = {"in_proj": 16, "conv1d": di, "x_proj": di, "dt_proj": rank, "out_proj": di}
    assert seen == {f"layers/{i}/mixer/{name}": ((n, n), 18.0) for i in range(2) for name, n in sizes.items()}


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        mamba.MambaConfig(vocab_size=8, hidden_size=0, num_layers=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        mamba.MambaConfig(vocab_size=8, hidden_size=8, num_layers=1, dtype="int8")
    assert mamba.MambaConfig(vocab_size=8, hidden_size=40, num_layers=1).time_step_rank == 3  # ceil(40 / 16)


# ----------------------------------------------------------------------------
# Parity with transformers (one transformers import for the whole file)
# ----------------------------------------------------------------------------


def _build(case: str, folder, seed: int):
    pytest.importorskip("transformers")
    return build_hf_mamba(folder, CASES[case], seed=seed)


class TestMambaFamily(FamilySuite):
    spec = FamilySpec(
        family=mamba.FAMILY,
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
        # per-channel int4 round to nearest and int8 on every site
        save_recipes=("rtn-w8", Recipe(name="rtn-w4", rules=(Rule(pattern=r".*", weight="int4"),))),
    )

    def test_several_scan_chunks_match_transformers(self, reference):
        """Chunks of 6 over T = 20: several chunks and a padded last one."""
        case, hf, folder = reference
        model = mamba.from_tensors(mamba.from_hf(folder).config.replace(scan_chunk_size=6), hf_io.read_safetensors(folder))
        tokens = _tokens(1)
        assert relative_error(fast_logits(model, tokens), torch_logits(hf, tokens)) < FLOAT32_TOLERANCE, case

    def test_decode_matches_transformers_cached_decode(self, reference):
        case, hf, folder = reference
        tokens = _tokens(2)
        ours = _decode(mamba.from_hf(folder), tokens, prefill=5)
        assert relative_error(ours, torch_ssm_decode_logits(hf, tokens, prefill=5)) < FLOAT32_TOLERANCE, case

    def test_bfloat16_compute(self, reference):
        """bfloat16 activations (float32 weights as stored); scan state and residual stay float32."""
        case, hf, folder = reference
        model = mamba.from_hf(folder, dtype="bfloat16")
        tokens = _tokens(6)
        ref = torch_logits(hf, tokens)
        full = fast_logits(model, tokens)
        assert full.dtype == jnp.bfloat16 and relative_error(full, ref) < BFLOAT16_TOLERANCE, case
        decoded, cache = fast_cached_logits(model, jnp.asarray(tokens), (4,) + (1,) * 16)
        assert relative_error(decoded, ref) < BFLOAT16_TOLERANCE, case
        assert cache.layers[0].ssm.dtype == jnp.float32 and cache.layers[0].conv.dtype == jnp.bfloat16

    def test_import_keeps_structure(self, reference):
        case, hf, folder = reference
        model = mamba.from_hf(folder)
        cfg = model.config
        assert cfg.tie_embeddings == (case == "tied") and (model.lm_head is None) == cfg.tie_embeddings
        assert cfg.time_step_rank == hf.config.time_step_rank and cfg.conv_kernel == hf.config.conv_kernel
        mixer = model.layers[0].mixer
        assert (mixer.conv1d.bias is None) == (not hf.config.use_conv_bias)
        np.testing.assert_array_equal(
            mixer.conv1d.weight[...], hf.backbone.layers[0].mixer.conv1d.weight.detach().numpy()[:, 0, :].T)

    def test_rejects_unhandled_config_attributes(self, reference, tmp_path):
        _, _, folder = reference
        with pytest.raises(ValueError, match="hidden_act='gelu'"):
            mamba.from_hf(copy_with_config(folder, tmp_path / "act", hidden_act="gelu"))
        with pytest.raises(ValueError, match=r"does not handle: \['use_falcon_norm'\]"):
            mamba.from_hf(copy_with_config(folder, tmp_path / "unknown", use_falcon_norm=True))
        with pytest.raises(ValueError, match="intermediate_size=48 differs from expand"):
            mamba.from_hf(copy_with_config(folder, tmp_path / "inner", intermediate_size=48))

    def test_rejects_bad_tensors(self, reference):
        case, _, folder = reference
        tensors = hf_io.read_safetensors(folder)
        cfg = mamba.from_hf(folder).config
        name = "backbone.layers.1.mixer.A_log"
        with pytest.raises(ValueError, match=f"{name}' is missing"):
            mamba.from_tensors(cfg, {k: v for k, v in tensors.items() if k != name})
        with pytest.raises(ValueError, match=r"conv1d.weight' has shape \(64, 4\)"):
            mamba.from_tensors(cfg, {**tensors, "backbone.layers.0.mixer.conv1d.weight": np.zeros((64, 4), np.float32)})
        with pytest.raises(ValueError, match="unexpected tensors"):
            mamba.from_tensors(cfg, {**tensors, "backbone.layers.0.mixer.extra": np.zeros(3, np.float32)})


# ----------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------


def test_rejects_a_mamba2_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    import transformers

    transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=4, n_groups=1, num_hidden_layers=1,
    )).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='mamba2'.*expects model_type='mamba' \(MambaForCausalLM\).*mamba2\.from_hf"):
        mamba.from_hf(tmp_path)
