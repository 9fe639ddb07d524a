"""Bundled tokenizer, tokenizer training, and token windows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jquant.data import BOS, EOS, PAD, load_split, load_tokenizer
from jquant.data.tokenizer import bytes_per_token, train_tokenizer
from jquant.data.windows import batches, random_windows, token_stream, token_windows

TRICKY = [
    "",
    "  To be, or not to be:\tthat is the question.\n\n",
    "Caf\u00e9 na\u00efve \u00c6sop \u2014 \u201cquoted\u201d \u4f60\u597d \U0001f642  ",
    "don't  . , ' trailing space ",
    "\r\nCRLF\rCR",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_bundled_tokenizer_round_trips_exactly(tokenizer) -> None:
    texts = TRICKY + list(load_split("validation")["text"][:200])
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_bundled_tokenizer_vocab_and_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == 4096
    assert [tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert tokenizer.encode("the king", add_special_tokens=True) == \
        tokenizer.encode("the king", add_special_tokens=False)  # no post-processor
    assert bytes_per_token(tokenizer, list(load_split("validation")["text"][:100])) > 2.5


def test_training_is_deterministic_and_round_trips() -> None:
    texts = [f"line {i}: the quality of mercy is not strain'd, {i * i}" for i in range(200)]
    first, second = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 300
    for text in TRICKY + texts[:5]:
        assert first.decode(first.encode(text, add_special_tokens=False)) == text


def test_training_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], 100)


PASSAGES = [f"Passage {i}: " + "and the evening and the morning were the day. " * (i % 5 + 1)
            for i in range(40)]


def test_token_stream_joins_passages_with_eos(tokenizer) -> None:
    stream = token_stream(PASSAGES, tokenizer)
    assert stream.dtype == np.int32
    expected = [t for p in PASSAGES for t in tokenizer.encode(p, add_special_tokens=False) + [1]]
    np.testing.assert_array_equal(stream, expected)
    with pytest.raises(TypeError, match="not a single str"):
        token_stream("one passage", tokenizer)


def test_token_windows_tile_the_stream(tokenizer) -> None:
    stream = token_stream(PASSAGES, tokenizer)
    windows = token_windows(PASSAGES, tokenizer, 32)
    n = len(stream) // 32
    assert windows.shape == (n, 32) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows.reshape(-1), stream[:n * 32])
    assert token_windows(PASSAGES, tokenizer, 32, max_windows=3).shape == (3, 32)
    overlapping = token_windows(PASSAGES, tokenizer, 32, stride=8)
    assert len(overlapping) == (len(stream) - 32) // 8 + 1
    np.testing.assert_array_equal(overlapping[1, :24], overlapping[0, 8:])
    with pytest.raises(ValueError, match="seq_len=100000 exceeds"):
        token_windows(PASSAGES, tokenizer, 100_000)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        token_windows(PASSAGES, tokenizer, 32, stride=0)


def test_token_stream_of_a_split_is_cached(tokenizer) -> None:
    split = load_split("validation")
    first = token_stream(split, tokenizer)
    assert token_stream(split, tokenizer) is first
    np.testing.assert_array_equal(first, token_stream(list(split["text"]), tokenizer))


def test_random_windows_are_deterministic_substrings(tokenizer) -> None:
    stream = token_stream(PASSAGES, tokenizer)
    a = random_windows(PASSAGES, tokenizer, 6, 16, jax.random.key(3))
    b = random_windows(PASSAGES, tokenizer, 6, 16, jax.random.key(3))
    c = random_windows(PASSAGES, tokenizer, 6, 16, jax.random.key(4))
    assert a.shape == (6, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    view = np.lib.stride_tricks.sliding_window_view(stream, 16)
    for window in a:
        assert (view == window).all(axis=1).any()


def test_batches() -> None:
    windows = np.arange(70, dtype=np.int32).reshape(7, 10)
    sizes = [len(b) for b in batches(windows, 3)]
    assert sizes == [3, 3, 1]
    assert [len(b) for b in batches(windows, 3, drop_last=True)] == [3, 3]
    np.testing.assert_array_equal(np.concatenate(list(batches(windows, 3))), windows)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(windows, 0))
