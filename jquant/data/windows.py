"""Fixed-length token windows over the corpus for training, calibration and evaluation.

Token stream convention: each passage is encoded without special tokens and
followed by ``<|eos|>``; passages are concatenated in corpus order::

    p0 <|eos|> p1 <|eos|> p2 <|eos|> ...

Windows are cut from this stream with no BOS prepended: a window starting in the
middle of a passage is the normal case, and ``<|eos|>`` already marks every
passage start (zero-shot evaluation prefixes contexts with ``<|eos|>`` for the
same reason). ``<|bos|>`` exists in the vocabulary but is never emitted here.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Union

import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    import datasets

TextsLike = Union["datasets.Dataset", Sequence[str]]

_STREAM_CACHE: dict[tuple[str, str], np.ndarray] = {}
_STREAM_CACHE_SIZE = 8


def _is_dataset(texts) -> bool:
    """Whether ``texts`` is a ``datasets.Dataset`` (without importing ``datasets`` when unused)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(texts, module.Dataset)


def token_stream(texts: TextsLike, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All passages encoded and joined with eos: int32 ``[n_tokens]``.

    ``texts`` is a corpus split (a :class:`datasets.Dataset` with a ``text``
    column) or a sequence of strings. Streams of datasets are cached in memory per
    (dataset fingerprint, tokenizer), so repeated calls on a split are free.
    """
    if _is_dataset(texts):
        key = (texts._fingerprint, _tokenizer_fingerprint(tokenizer))
        if key not in _STREAM_CACHE:
            if len(_STREAM_CACHE) >= _STREAM_CACHE_SIZE:
                del _STREAM_CACHE[next(iter(_STREAM_CACHE))]  # oldest entry
            _STREAM_CACHE[key] = _encode_stream(list(texts["text"]), tokenizer)
        return _STREAM_CACHE[key]
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of passages, not a single str; "
                        "wrap it in a list.")
    return _encode_stream(list(texts), tokenizer)


def _encode_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; use jquant.data.tokenizer.load_tokenizer().")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int32)


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def token_windows(texts: TextsLike, tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                  max_windows: int | None = None, stride: int | None = None) -> np.ndarray:
    """Windows cut from the start of the token stream: int32 ``[N, seq_len]``.

    Window ``i`` is ``stream[i * stride : i * stride + seq_len]``; ``stride``
    defaults to ``seq_len`` (non-overlapping, so the windows tile
    ``stream[:N * seq_len]`` exactly). A final partial window is dropped.
    ``max_windows`` keeps only the first ones.
    """
    stream = token_stream(texts, tokenizer)
    stride = seq_len if stride is None else stride
    _check_positive(seq_len=seq_len, stride=stride)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    if len(stream) < seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the {len(stream)}-token stream; "
                         "use a shorter seq_len or more text.")
    n = (len(stream) - seq_len) // stride + 1
    n = n if max_windows is None else min(n, max_windows)
    starts = np.arange(n) * stride
    return stream[starts[:, None] + np.arange(seq_len)]


def random_windows(texts: TextsLike, tokenizer: PreTrainedTokenizerBase, n: int, seq_len: int,
                   key: jax.Array) -> np.ndarray:
    """``n`` windows at uniform random stream offsets: int32 ``[n, seq_len]``.

    Offsets are drawn with ``jax.random.randint(key, ...)``, so the result is a
    pure function of (texts, tokenizer, n, seq_len, key). Windows may overlap.
    """
    _check_positive(n=n, seq_len=seq_len)
    stream = token_stream(texts, tokenizer)
    if len(stream) < seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the {len(stream)}-token stream; "
                         "use a shorter seq_len or more text.")
    starts = np.asarray(jax.random.randint(key, (n,), 0, len(stream) - seq_len + 1))
    return stream[starts[:, None] + np.arange(seq_len)]


def batches(windows: np.ndarray, batch_size: int, *, drop_last: bool = False
            ) -> Iterator[np.ndarray]:
    """Consecutive ``[batch_size, seq_len]`` slices of ``windows`` (the last may be short)."""
    _check_positive(batch_size=batch_size)
    stop = len(windows) - len(windows) % batch_size if drop_last else len(windows)
    for start in range(0, stop, batch_size):
        yield windows[start:start + batch_size]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
