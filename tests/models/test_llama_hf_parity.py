"""Parity of jquant's Llama family with transformers' PyTorch models, through files on disk.

Each case builds a tiny random transformers model with every tensor perturbed
(``jquant.testing.hf_reference``), writes it with ``save_pretrained`` and loads
it with ``llama.from_hf``.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jquant.generate import generate  # noqa: E402
from jquant.models import hf_io, llama  # noqa: E402
from jquant.testing.hf_reference import (  # noqa: E402
    LLAMA_BASE,
    LLAMA_FAMILY_CASES,
    build_llama_family,
    relative_error,
    torch_logits,
)

# transformers computes RMSNorm, RoPE angles and the attention softmax in float32 even in a float64
# model, so ~1e-7 is its own rounding floor there; jquant keeps float64 throughout except RoPE angles.
FLOAT64_TOLERANCE = 2e-6
FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=sorted(LLAMA_FAMILY_CASES))
def pair(request, tmp_path_factory):
    case = request.param
    folder = tmp_path_factory.mktemp(case)
    # the llama3 case is written in 40 kB shards to exercise the sharded-index loader
    hf = build_llama_family(case, folder, seed=sorted(LLAMA_FAMILY_CASES).index(case),
                            max_shard_size="40KB" if case.startswith("llama3") else "1GB")
    return case, hf, folder


def _tokens(seed: int, batch=2, length=12):
    return np.random.default_rng(seed).integers(3, LLAMA_BASE["vocab_size"], size=(batch, length)).astype(np.int32)


def test_prefill_logits_float32(pair):
    case, hf, folder = pair
    tokens = _tokens(1)
    assert relative_error(llama.from_hf(folder)(tokens), torch_logits(hf, tokens)) < FLOAT32_TOLERANCE, case


def test_prefill_and_decode_float64(pair):
    case, hf, folder = pair
    jax.config.update("jax_enable_x64", True)
    try:
        ours = llama.from_hf(folder, dtype="float64")
        tokens = _tokens(2)
        ref = torch_logits(hf.double(), tokens)
        hf.float()
        assert relative_error(ours(tokens), ref) < FLOAT64_TOLERANCE, case
        cache = ours.init_cache(tokens.shape[0], tokens.shape[1])
        logits, cache = ours.step(tokens[:, :3], cache)
        steps = [logits]
        for t in range(3, tokens.shape[1]):
            logits, cache = ours.step(tokens[:, t : t + 1], cache)
            steps.append(logits)
        assert relative_error(np.concatenate(steps, axis=1), ref) < FLOAT64_TOLERANCE, case
    finally:
        jax.config.update("jax_enable_x64", False)


def test_token_by_token_decode_float32(pair):
    case, hf, folder = pair
    ours = llama.from_hf(folder)
    tokens = _tokens(3, batch=1, length=10)
    cache = ours.init_cache(1, 16)
    got = []
    for t in range(tokens.shape[1]):
        logits, cache = ours.step(tokens[:, t : t + 1], cache)
        got.append(np.asarray(logits))
    assert relative_error(np.concatenate(got, axis=1), torch_logits(hf, tokens)) < FLOAT32_TOLERANCE, case


def test_greedy_generation_matches(pair):
    case, hf, folder = pair
    prompt = _tokens(4, batch=2, length=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(generate(llama.from_hf(folder), prompt, 8), ref)


def test_export_round_trip_is_exact(pair, tmp_path):
    case, hf, folder = pair
    llama.to_hf(llama.from_hf(folder), tmp_path / "export", max_shard_bytes=30_000)
    original = hf_io.read_safetensors(folder)
    exported = hf_io.read_safetensors(tmp_path / "export")
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
    reloaded = getattr(transformers, LLAMA_FAMILY_CASES[case][0]).from_pretrained(
        tmp_path / "export", attn_implementation="eager").eval()
    tokens = _tokens(5)
    np.testing.assert_array_equal(torch_logits(hf, tokens), torch_logits(reloaded, tokens))
