"""Parity of jquant's Llama family with transformers' PyTorch models, through files on disk.

Each case builds a tiny random transformers model, perturbs every tensor (norm
weights and biases included, so no path is tested vacuously), writes it with
``save_pretrained`` and loads it with ``llama.from_hf``.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jquant.generate import generate  # noqa: E402
from jquant.models import llama  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128,
            attn_implementation="eager")
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama3-gqa-untied": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=ROPE_LLAMA3)),
    "llama2-mha-tied-bias": ("LlamaForCausalLM", "LlamaConfig",
                             dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral-sliding-window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=5, head_dim=16)),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24, num_key_value_heads=1)),
}


def _build_hf(case: str, folder, seed: int, shard: bool = False):
    cls_name, cfg_name, extra = CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    return model


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _build_hf(request.param, folder, seed=sorted(CASES).index(request.param), shard=request.param.startswith("llama3"))
    return request.param, hf, folder


def _tokens(seed: int, batch=2, length=12):
    return np.random.default_rng(seed).integers(3, BASE["vocab_size"], size=(batch, length)).astype(np.int32)


def test_prefill_logits_float32(pair):
    case, hf, folder = pair
    ours = llama.from_hf(folder)
    tokens = _tokens(1)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(tokens))
    assert _rel(got, ref) < 1e-5, case


# transformers computes RMSNorm, RoPE angles and the attention softmax in float32 even in a float64
# model, so ~1e-7 is its own rounding floor there; jquant keeps float64 throughout except RoPE angles.
FLOAT64_TOLERANCE = 2e-6


def test_prefill_and_decode_float64(pair):
    case, hf, folder = pair
    jax.config.update("jax_enable_x64", True)
    try:
        ours = llama.from_hf(folder, dtype="float64")
        tokens = _tokens(2)
        with torch.no_grad():
            ref = hf.double()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
            hf.float()
        assert _rel(ours(tokens), ref) < FLOAT64_TOLERANCE, case
        cache = ours.init_cache(tokens.shape[0], tokens.shape[1])
        steps = []
        logits, cache = ours.step(tokens[:, :3], cache)
        steps.append(logits)
        for t in range(3, tokens.shape[1]):
            logits, cache = ours.step(tokens[:, t : t + 1], cache)
            steps.append(logits)
        assert _rel(np.concatenate(steps, axis=1), ref) < FLOAT64_TOLERANCE, case
    finally:
        jax.config.update("jax_enable_x64", False)


def test_token_by_token_decode_float32(pair):
    case, hf, folder = pair
    ours = llama.from_hf(folder)
    tokens = _tokens(3, batch=1, length=10)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    cache = ours.init_cache(1, 16)
    got = []
    for t in range(tokens.shape[1]):
        logits, cache = ours.step(tokens[:, t : t + 1], cache)
        got.append(np.asarray(logits))
    assert _rel(np.concatenate(got, axis=1), ref) < 1e-5, case


def test_greedy_generation_matches(pair):
    case, hf, folder = pair
    ours = llama.from_hf(folder)
    prompt = _tokens(4, batch=2, length=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0).numpy()
    got = generate(ours, prompt, 8)
    np.testing.assert_array_equal(got, ref)


def test_export_round_trip_is_exact(pair, tmp_path):
    case, hf, folder = pair
    ours = llama.from_hf(folder)
    llama.to_hf(ours, tmp_path / "export", max_shard_bytes=30_000)
    from jquant.models import hf_io

    original = hf_io.read_safetensors(folder)
    exported = hf_io.read_safetensors(tmp_path / "export")
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
    reloaded = getattr(transformers, CASES[case][0]).from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    tokens = _tokens(5)
    with torch.no_grad():
        a = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        b = reloaded(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(a, b)
