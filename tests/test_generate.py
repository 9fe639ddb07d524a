"""Generation: cached decoding equals recomputation, sampling is keyed, eos sticks."""

import jax
import numpy as np
import pytest

from jquant.generate import SamplingConfig, generate
from jquant.models import llama

CFG = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return llama.init_model(CFG, jax.random.key(3))


def test_greedy_equals_full_recompute(model):
    prompt = np.random.default_rng(0).integers(0, 50, size=(2, 4)).astype(np.int32)
    out = generate(model, prompt, 6)
    seq = prompt
    for _ in range(6):
        nxt = np.argmax(np.asarray(model(seq))[:, -1], axis=-1)[:, None].astype(np.int32)
        seq = np.concatenate([seq, nxt], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_sampling_is_a_function_of_the_key(model):
    prompt = np.zeros((1, 3), np.int32)
    sampling = SamplingConfig(temperature=1.5, top_k=10)
    a = generate(model, prompt, 12, sampling=sampling, key=jax.random.key(1))
    b = generate(model, prompt, 12, sampling=sampling, key=jax.random.key(1))
    c = generate(model, prompt, 12, sampling=sampling, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, prompt, 3, sampling=sampling)


def test_eos_is_sticky(model):
    prompt = np.zeros((1, 2), np.int32)
    free = generate(model, prompt, 8)
    eos = int(free[0, 3])  # force the second generated token to count as eos
    out = generate(model, prompt, 8, eos_token_id=eos)
    first = int(np.argmax(out[0, 2:] == eos)) + 2
    assert (out[0, first:] == eos).all()
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])


def test_bad_arguments():
    m = llama.init_model(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt"):
        generate(m, np.zeros((3,), np.int32), 2)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
