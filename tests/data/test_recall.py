"""Associative-recall rows and prompts (jquant.data.recall): every query is answerable from its block alone."""

import numpy as np
import pytest

from jquant.data.recall import (
    RecallAlphabet,
    make_recall_example,
    recall_alphabet,
    recall_window,
)

VOCAB = 1024


@pytest.fixture(scope="module")
def alphabet() -> RecallAlphabet:
    return recall_alphabet(VOCAB, exclude=(0, 1, 2), n_keys=128, n_values=128, seed=3)


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return np.random.default_rng(0).integers(3, VOCAB, size=20_000).astype(np.int32)


def test_alphabet_is_disjoint_avoids_specials_and_is_fixed_by_its_seed(alphabet):
    assert len(alphabet.keys) == len(alphabet.values) == 128
    assert not np.intersect1d(alphabet.keys, alphabet.values).size
    assert not np.isin([0, 1, 2], np.concatenate([alphabet.keys, alphabet.values])).any()
    again = recall_alphabet(VOCAB, exclude=(0, 1, 2), n_keys=128, n_values=128, seed=3)
    np.testing.assert_array_equal(again.keys, alphabet.keys)
    other = recall_alphabet(VOCAB, exclude=(0, 1, 2), n_keys=128, n_values=128, seed=4)
    assert not np.array_equal(other.keys, alphabet.keys)
    with pytest.raises(ValueError, match="n_keys"):
        recall_alphabet(16, exclude=(0,), n_keys=8, n_values=8)
    with pytest.raises(ValueError, match="disjoint"):
        RecallAlphabet(keys=np.array([5, 6]), values=np.array([6, 7]))


def _pairs(row: np.ndarray, alphabet: RecallAlphabet, value_len: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(position, key, value)`` for every key-alphabet token of ``row`` followed by ``value_len`` values."""
    out = []
    for i in range(len(row) - value_len):
        value = row[i + 1:i + 1 + value_len]
        if row[i] in alphabet.keys and np.isin(value, alphabet.values).all():
            out.append((i, int(row[i]), tuple(int(v) for v in value)))
    return out


@pytest.mark.parametrize("filler", [True, False])
@pytest.mark.parametrize("value_len", [1, 2])
def test_recall_window_queries_repeat_their_blocks_values(alphabet, filler, value_len):
    # text without alphabet tokens, so every key-value pair found is the block's or a query
    text_tokens = np.setdiff1d(np.arange(3, VOCAB), np.concatenate([alphabet.keys, alphabet.values]))
    text = np.random.default_rng(1).choice(text_tokens, size=20_000).astype(np.int32)
    length, n_pairs, n_queries, step = 300, 12, 9, 1 + value_len
    for seed in range(5):
        row = recall_window(text, alphabet, length, np.random.default_rng(seed), n_pairs=n_pairs,
                            n_queries=n_queries, value_len=value_len, filler=filler)
        assert row.shape == (length,) and row.dtype == np.int32
        events = _pairs(row, alphabet, value_len)
        assert len(events) == n_pairs + n_queries
        block, queries = events[:n_pairs], events[n_pairs:]
        assert [p for p, _, _ in block] == [block[0][0] + step * j for j in range(n_pairs)]  # back to back
        value_of = {k: v for _, k, v in block}
        assert len(value_of) == n_pairs  # distinct keys
        assert all(value_of.get(k) == v for _, k, v in queries)
        if not filler:
            assert [p for p, _, _ in events] == [step * j for j in range(n_pairs + n_queries)]


def test_recall_window_refuses_rows_that_do_not_fit(alphabet, stream):
    with pytest.raises(ValueError, match="do not fit in 20 tokens"):
        recall_window(stream, alphabet, 20, np.random.default_rng(0), n_pairs=8, n_queries=4)
    with pytest.raises(ValueError, match="n_pairs=200"):
        recall_window(stream, alphabet, 2000, np.random.default_rng(0), n_pairs=200, n_queries=4)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_recall_example_answer_is_the_asked_keys_value_in_the_block(alphabet, stream, depth):
    for seed in range(6):
        ex = make_recall_example(stream, alphabet, context_len=400, depth=depth, rng=np.random.default_rng(seed),
                                 n_pairs=10, value_len=2)
        assert ex.prompt.shape == (400,) and ex.answer.shape == (2,) and ex.depth == depth
        key = ex.prompt[-1]
        where = np.flatnonzero(ex.prompt[:-1] == key)
        assert len(where) == 1  # the asked key occurs once before the question: inside the block
        at = int(where[0])
        assert ex.needle_start <= at < ex.needle_start + 30
        np.testing.assert_array_equal(ex.prompt[at + 1:at + 3], ex.answer)
        filler_len = 400 - 30 - 1
        assert ex.needle_start == round(depth * filler_len)


def test_recall_example_checks_its_arguments(alphabet, stream):
    with pytest.raises(ValueError, match="depth"):
        make_recall_example(stream, alphabet, context_len=400, depth=1.5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="context_len=20"):
        make_recall_example(stream, alphabet, context_len=20, depth=0.5, rng=np.random.default_rng(0))
