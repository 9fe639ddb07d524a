"""RWKV-6: the shared family suite against BlinkDL's ``rwkv`` package, chunked vs recurrent WKV, checkpoint
import and refusals.

The reference model is a BlinkDL-layout state dict built by hand with torch
(every tensor perturbed), saved as ``.pth`` and run by ``rwkv.model.RWKV`` on
CPU in float32 (batch 1, token lists).
"""

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant.models
from jquant import ops
from jquant.models import rwkv6
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites
from jquant.testing.family_suite import FamilySpec, FamilySuite
from jquant.testing.hf_reference import relative_error

C, HEADS, LAYERS, VOCAB, FFN, MIX_RANK, DECAY_RANK = 128, 2, 2, 256, 256, 32, 64
FLOAT32_TOLERANCE = 1e-5

_forward = nnx.jit(lambda m, tokens: m(tokens))
_step = nnx.jit(lambda m, tokens, state: m.step(tokens, state))
_wkv_recurrent = jax.jit(ops.wkv6_recurrent)
_wkv_chunked = jax.jit(ops.wkv6_chunked, static_argnames="chunk_size")


def _blinkdl_state_dict(seed: int) -> dict:
    """A random RWKV-6 state dict in BlinkDL's layout (torch float32 tensors), every tensor perturbed."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    n = C // HEADS
    sd = {"emb.weight": normal(VOCAB, C), "head.weight": normal(VOCAB, C, std=C**-0.5),
          "ln_out.weight": normal(C, std=0.1, mean=1.0), "ln_out.bias": normal(C, std=0.1)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            sd[p + ln + ".weight"] = normal(C, std=0.1, mean=1.0)
            sd[p + ln + ".bias"] = normal(C, std=0.1)
        for slot in "xwkvrg":
            sd[p + f"att.time_maa_{slot}"] = uniform(1, 1, C)
        sd[p + "att.time_maa_w1"] = normal(C, 5 * MIX_RANK, std=0.1)
        sd[p + "att.time_maa_w2"] = normal(5, MIX_RANK, C, std=0.1)
        sd[p + "att.time_decay"] = uniform(1, 1, C, low=-5.0, high=1.0)  # up to exp(-e) ≈ 0.07 per step
        sd[p + "att.time_decay_w1"] = normal(C, DECAY_RANK, std=0.1)
        sd[p + "att.time_decay_w2"] = normal(DECAY_RANK, C, std=0.1)
        sd[p + "att.time_faaaa"] = uniform(HEADS, n)
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{name}.weight"] = normal(C, C, std=C**-0.5)
        sd[p + "att.ln_x.weight"] = normal(C, std=0.1, mean=1.0)
        sd[p + "att.ln_x.bias"] = normal(C, std=0.1)
        sd[p + "ffn.time_maa_k"] = uniform(1, 1, C)
        sd[p + "ffn.time_maa_r"] = uniform(1, 1, C)
        sd[p + "ffn.key.weight"] = normal(FFN, C, std=C**-0.5)
        sd[p + "ffn.receptance.weight"] = normal(C, C, std=C**-0.5)
        sd[p + "ffn.value.weight"] = normal(C, FFN, std=FFN**-0.5)
    return sd


FILE = "rwkv6-tiny.pth"


def _tokens(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=length).tolist()


@dataclasses.dataclass(frozen=True)
class Reference:
    """BlinkDL's ``rwkv`` package running a checkpoint on CPU in float32, and the checkpoint's state dict."""

    rwkv: object
    state_dict: dict


def _build(case: str, folder: Path, seed: int) -> Reference:
    torch = pytest.importorskip("torch")
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    rwkv_model = pytest.importorskip("rwkv.model")
    sd = _blinkdl_state_dict(seed)
    torch.save(sd, folder / FILE)
    return Reference(rwkv_model.RWKV(model=str(folder / FILE), strategy="cpu fp32", verbose=False), sd)


def _package_logits(reference: Reference, tokens: np.ndarray, dtype: str) -> np.ndarray:
    """The package's sequence logits, one sequence (a token list) at a time."""
    import torch

    with torch.no_grad():
        return np.stack([reference.rwkv.forward(row.tolist(), None, full_output=True)[0].numpy() for row in tokens])


def _load(folder: Path, dtype: str):
    return rwkv6.from_blinkdl(folder / FILE, dtype=dtype, chunk_size=8)


class TestRWKV6Family(FamilySuite):
    spec = FamilySpec(
        family=rwkv6.FAMILY,
        tiny_config=rwkv6.RWKV6Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                                      head_size=16, mix_rank=4, decay_rank=8, chunk_size=4),
        vocab_size=VOCAB,
        cases=("blinkdl",),
        build_reference=_build,
        reference_logits=_package_logits,
        load=_load,
        parity_shape=(1, 21),  # not a multiple of the chunk size (8)
        decode_prefill=5,
        float32_tolerance=FLOAT32_TOLERANCE,
        # Per-channel int4 by GPTQ on the linears (no clip search, to stay fast); the element-wise token-shift
        # mixes have no GEMM for GPTQ: they take int8 RTN.
        save_recipes=("rtn-w8", Recipe(name="rwkv6-gptq-w4", rules=(
            Rule(pattern=r".*/time_maa_[xwkvrg]", weight="int8"), Rule(pattern=r".*", weight="int4", algorithm="gptq")))),
        # batch 3, 19 tokens, chunk 4: prefill (chunked, carried state) + recurrent decode
        decode_shape=(3, 19),
        decode_chunks=((13,) + (1,) * 6,),
    )

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, reference):
        return _load(reference[2], "float32")

    def test_config_inferred_from_shapes(self, model):
        cfg = model.config
        assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size, cfg.num_layers,
                cfg.mix_rank, cfg.decay_rank) == (VOCAB, C, HEADS, C // HEADS, FFN, LAYERS, MIX_RANK, DECAY_RANK)

    def test_sequence_state_matches_rwkv_package(self, model, reference):
        torch = pytest.importorskip("torch")
        tokens = _tokens(1, 21)  # not a multiple of the chunk size (8)
        with torch.no_grad():
            ref, ref_state = reference[1].rwkv.forward(tokens, None, full_output=True)
        logits, state = _step(model, jnp.asarray([tokens]), model.init_cache(1))
        assert relative_error(logits[0], ref.numpy()) < FLOAT32_TOLERANCE
        for i, layer in enumerate(state):  # the package's state: att shift, wkv [H, N, N], ffn shift per layer
            assert relative_error(layer.att_shift[0], ref_state[3 * i].numpy()) < FLOAT32_TOLERANCE
            assert relative_error(layer.wkv[0], ref_state[3 * i + 1].numpy()) < FLOAT32_TOLERANCE
            assert relative_error(layer.ffn_shift[0], ref_state[3 * i + 2].numpy()) < FLOAT32_TOLERANCE

    def test_token_by_token_decode_matches_rwkv_package(self, model, reference):
        torch = pytest.importorskip("torch")
        tokens = _tokens(2, 12)
        ref, ours = [], []
        ref_state, state = None, model.init_cache(1)
        with torch.no_grad():
            for t in tokens:  # one token at a time: the package's att_one_v6_0 path
                logits, ref_state = reference[1].rwkv.forward([t], ref_state)
                ref.append(logits.numpy())
                logits, state = _step(model, jnp.asarray([[t]]), state)
                ours.append(np.asarray(logits[0, 0]))
        assert relative_error(np.stack(ours), np.stack(ref)) < FLOAT32_TOLERANCE

    def test_safetensors_file_loads_like_pth(self, reference, model, tmp_path):
        from safetensors.torch import save_file

        path = tmp_path / "rwkv6-tiny.safetensors"
        save_file({k: v.contiguous() for k, v in reference[1].state_dict.items()}, path)
        tokens = jnp.asarray([_tokens(4, 9)])
        np.testing.assert_array_equal(_forward(rwkv6.from_blinkdl(path, chunk_size=8), tokens), _forward(model, tokens))

    def test_registry_loads_blinkdl_files(self, reference):
        loaded = jquant.models.load(reference[2] / FILE)
        assert isinstance(loaded.model, rwkv6.RWKV6) and loaded.tokenizer is None
        assert loaded.model.config.num_layers == LAYERS

    def test_blinkdl_round_trip(self, reference, model):
        exported = rwkv6.to_blinkdl(model)
        assert sorted(exported) == sorted(reference[1].state_dict)
        for name, value in reference[1].state_dict.items():
            np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)

    def test_elementwise_mixes_are_quantization_sites(self, model):
        kinds = {s.path: s.spec.kind for s in find_sites(model)}
        expected = [f"layers/{i}/att/time_maa_{s}" for i in range(LAYERS) for s in "xwkvrg"]
        expected += [f"layers/{i}/ffn/time_maa_{s}" for i in range(LAYERS) for s in "kr"]
        assert all(kinds[p] == "elementwise" for p in expected)
        assert kinds["layers/1/att/time_maa_w2/4"] == kinds["layers/0/att/time_decay_w1"] == "linear"
        assert sum(k == "elementwise" for k in kinds.values()) == len(expected)

    def test_bad_checkpoints_are_refused(self, reference, tmp_path):
        sd = {k: v.numpy() for k, v in reference[1].state_dict.items()}
        with pytest.raises(ValueError, match="not an RWKV checkpoint"):
            rwkv6.from_blinkdl(_save({"model.embed_tokens.weight": np.zeros((4, 8))}, tmp_path / "a.safetensors"))
        missing = {k: v for k, v in sd.items() if k != "blocks.1.att.time_maa_g"}
        with pytest.raises(ValueError, match="'blocks.1.att.time_maa_g' is missing"):
            rwkv6.from_blinkdl(_save(missing, tmp_path / "b.safetensors"))
        extra = sd | {"blocks.0.att.time_state": np.zeros((2, 64, 64))}
        with pytest.raises(ValueError, match="unexpected tensors.*time_state"):
            rwkv6.from_blinkdl(_save(extra, tmp_path / "c.safetensors"))
        wrong = sd | {"blocks.0.att.gate.weight": np.zeros((C, C + 1))}
        with pytest.raises(ValueError, match="'blocks.0.att.gate.weight' has shape"):
            rwkv6.from_blinkdl(_save(wrong, tmp_path / "d.safetensors"))
        with pytest.raises(ValueError, match=r"\.pth or \.safetensors"):
            rwkv6.from_blinkdl(_save(sd, tmp_path / "e.bin"))


def _random_wkv_inputs(seed: int, batch=3, length=37, heads=2, n=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (batch, length, heads, n)
    r, k, v = (jax.random.normal(kk, shape, dtype) for kk in keys[:3])
    log_w = -jnp.exp(3.0 * jax.random.normal(keys[3], shape, dtype))  # decays from ~1 to e^-8000
    u = jax.random.normal(keys[4], (heads, n), dtype)
    state = jax.random.normal(keys[5], (batch, heads, n, n), dtype)
    return r, k, v, log_w, u, state


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_chunked_wkv_equals_recurrence(chunk_size):
    r, k, v, log_w, u, state = _random_wkv_inputs(0)
    o_ref, s_ref = _wkv_recurrent(r, k, v, log_w, u, state)
    o, s = _wkv_chunked(r, k, v, log_w, u, state, chunk_size=chunk_size)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
    assert relative_error(o, o_ref) < FLOAT32_TOLERANCE
    assert relative_error(s, s_ref) < FLOAT32_TOLERANCE


def test_chunked_wkv_equals_recurrence_float64(x64):
    r, k, v, log_w, u, state = _random_wkv_inputs(1, length=20, dtype=jnp.float64)
    o_ref, s_ref = _wkv_recurrent(r, k, v, log_w, u, state)
    o, s = _wkv_chunked(r, k, v, log_w, u, state, chunk_size=16)
    assert relative_error(o, o_ref) < 1e-12 and relative_error(s, s_ref) < 1e-12


def test_chunked_wkv_gradients_are_finite():
    r, k, v, log_w, u, state = _random_wkv_inputs(2, length=11)
    loss = lambda *a: jnp.sum(ops.wkv6_chunked(*a, chunk_size=4)[0] ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(r, k, v, log_w, u, state)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def _save(tensors: dict, path):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)
    return path


@pytest.mark.parametrize("version, per_block", [
    ("RWKV-4", ["att.time_first", "att.time_mix_k", "att.key.weight"]),
    ("RWKV-5", ["att.time_faaaa", "att.ln_x.weight", "att.gate.weight"]),
    ("RWKV-7", ["att.x_r", "att.w0", "att.a0", "att.k_k", "att.r_k", "att.ln_x.weight"]),
])
def test_other_rwkv_versions_are_refused(tmp_path, version, per_block):
    tensors = {"emb.weight": np.zeros((4, 8))} | {f"blocks.0.{k}": np.zeros((1, 1, 8)) for k in per_block}
    path = _save(tensors, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=rf"{version}.*only RWKV-6 \(Finch, x060\) is supported"):
        rwkv6.from_blinkdl(path)


def test_config_is_validated():
    with pytest.raises(ValueError, match="not a multiple of head_size"):
        rwkv6.RWKV6Config(vocab_size=8, hidden_size=100, intermediate_size=8, num_layers=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rwkv6.RWKV6Config(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, chunk_size=0)
