"""Perplexity against a float64 numpy reference, batching, and compile counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.data import load_split, load_tokenizer, token_windows
from jquant.eval.perplexity import perplexity, split_perplexity, target_logprobs

V = 17
TRACED_SHAPES: list[tuple[int, ...]] = []  # appended to whenever a Bigram call is traced


class Bigram(nnx.Module):
    """``logits[b, t] = table[tokens[b, t]]``."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        TRACED_SHAPES.append(tokens.shape)
        return self.table[tokens]


def _reference_nll(table: np.ndarray, windows: np.ndarray) -> float:
    """Mean next-token NLL in float64."""
    logits = table.astype(np.float64)[windows[:, :-1]]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return float((logz - target).mean())


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return (np.random.default_rng(0).normal(size=(V, V)) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(1).integers(0, V, size=(7, 12)).astype(np.int32)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_module_matches_float64_reference(table, windows, batch_size) -> None:
    result = perplexity(Bigram(table), windows, batch_size=batch_size, progress=False)
    ref = _reference_nll(table, windows)
    assert result.n_tokens == windows.shape[0] * (windows.shape[1] - 1)
    np.testing.assert_allclose(result.nll, ref, rtol=1e-5)
    np.testing.assert_allclose(result.ppl, np.exp(ref), rtol=1e-5)


def test_plain_callable_matches_reference(table, windows) -> None:
    params = jnp.asarray(table)
    result = perplexity(lambda tokens: params[tokens], windows, batch_size=2, progress=False)
    np.testing.assert_allclose(result.nll, _reference_nll(table, windows), rtol=1e-5)


def test_one_compile_per_shape(table, windows) -> None:
    model = Bigram(table)
    TRACED_SHAPES.clear()  # shapes below are used by no other test (the jit cache is global)
    perplexity(model, windows[:, :11], batch_size=5, progress=False)  # 2 batches, last padded
    perplexity(model, windows[:4, :11], batch_size=5, progress=False)
    assert TRACED_SHAPES == [(5, 11)]
    perplexity(model, windows[:, :6], batch_size=5, progress=False)
    assert TRACED_SHAPES == [(5, 11), (5, 6)]

    calls = []

    def fn(tokens: jax.Array) -> jax.Array:
        calls.append(tokens.shape)
        return jnp.asarray(table)[tokens]

    perplexity(fn, windows, batch_size=2, progress=False)
    perplexity(fn, windows[:3], batch_size=2, progress=False)
    assert calls == [(2, windows.shape[1])]


def test_target_logprobs_rows_are_independent_of_batching(table, windows) -> None:
    model = Bigram(table)
    full = target_logprobs(model, windows, batch_size=4)
    one = np.concatenate([target_logprobs(model, w[None], batch_size=1) for w in windows])
    assert full.shape == (7, 11) and full.dtype == np.float32
    np.testing.assert_allclose(full, one, rtol=1e-6)


def test_bad_inputs_name_the_problem(table, windows) -> None:
    model = Bigram(table)
    with pytest.raises(ValueError, match="windows is empty"):
        perplexity(model, windows[:0], progress=False)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        perplexity(model, windows[0], progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        perplexity(model, windows.astype(np.float32), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows, batch_size=0, progress=False)


class LowRank(nnx.Module):
    def __init__(self, vocab: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.out = nnx.Linear(8, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.out(self.embed(tokens))


def test_split_perplexity_on_bundled_validation() -> None:
    tokenizer = load_tokenizer()
    model = LowRank(len(tokenizer), nnx.Rngs(0))
    result = split_perplexity(model, tokenizer, "validation", seq_len=64, max_windows=3,
                              progress=False)
    windows = token_windows(load_split("validation"), tokenizer, 64, max_windows=3)
    assert result == perplexity(model, windows, progress=False)
    assert result.n_tokens == 3 * 63
