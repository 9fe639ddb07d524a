"""KL divergence and top-1 agreement of two logits functions against float64 numpy on fresh random models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.eval.agreement import distribution_agreement


def _float64_reference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(KL(softmax b || softmax a), top-1 agreement) over positions 0..T-2 of logits [N, T, V], in float64."""
    a, b = a[:, :-1].astype(np.float64), b[:, :-1].astype(np.float64)
    log_q = a - a.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    log_p = b - b.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    return float(kl), float((a.argmax(-1) == b.argmax(-1)).mean())


class _Table(nnx.Module):
    """A bigram "language model": logits of token t are row t of a table (an nnx.Module, compiled as one)."""

    def __init__(self, table: np.ndarray):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, tokens):
        return self.table[...][tokens]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_float64_maths_with_padded_batches(batch_size):
    rng = np.random.default_rng()
    vocab = 11
    table = rng.normal(size=(vocab, vocab)) * 2
    noisy = table + rng.normal(size=table.shape) * 0.7
    windows = rng.integers(0, vocab, (5, 9))
    got = distribution_agreement(_Table(noisy), _Table(table), windows, batch_size=batch_size)
    want_kl, want_top1 = _float64_reference(noisy.astype(np.float32)[windows], table.astype(np.float32)[windows])
    assert got.n_positions == 5 * 8
    np.testing.assert_allclose(got.kl, want_kl, rtol=1e-5)
    assert got.top1 == pytest.approx(want_top1, abs=1e-12)
    assert got.kl > 0  # the perturbed model differs (whether an argmax moves depends on the draw)


def test_identical_models_agree_exactly_and_plain_callables_work():
    rng = np.random.default_rng()
    table = jnp.asarray(rng.normal(size=(7, 7)), jnp.float32)
    fn = lambda tokens: table[tokens]  # noqa: E731
    got = distribution_agreement(fn, fn, rng.integers(0, 7, (3, 6)))
    assert got.kl == pytest.approx(0.0, abs=1e-7) and got.top1 == 1.0


def test_bad_input_is_refused():
    table = _Table(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="windows"):
        distribution_agreement(table, table, np.zeros((2, 1), np.int32))
    with pytest.raises(TypeError, match="integer"):
        distribution_agreement(table, table, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        distribution_agreement(table, table, np.zeros((2, 3), np.int32), batch_size=0)
    with pytest.raises(ValueError, match="same vocabulary"):
        distribution_agreement(table, _Table(np.zeros((4, 5))), np.zeros((2, 3), np.int32))
