"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") placed in natural text.

A recall block is ``n_pairs`` key-value pairs written one after another, ``k_1 v_1 k_2 v_2 ... k_n v_n``:
each key is one token of ``RecallAlphabet.keys`` (no key twice in a block) and each value ``value_len``
tokens of ``RecallAlphabet.values``. A query is a key of the block followed later by its value, so only
reading the block back through the context predicts the value's tokens.

- ``recall_window`` builds training rows: a natural-text window holding one block and, after it, queries of
  some of its keys at random places (with ``filler=False`` the queries follow the block directly: the dense
  rows that teach the lookup fastest).
- ``make_recall_example`` builds an evaluation prompt of exactly ``context_len`` tokens: the block at
  ``depth`` of a haystack window, the prompt ending with one of its keys; the answer is that key's value.
  It returns a ``jquant.data.needle.NeedleExample``, so ``jquant.eval.retrieval.needle_retrieval`` scores
  it through the (possibly quantized) KV cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jquant.data.needle import NeedleExample


@dataclasses.dataclass(frozen=True)
class RecallAlphabet:
    """Disjoint token ids ``keys [n_keys]`` and ``values [n_values]`` for recall blocks."""

    keys: np.ndarray
    values: np.ndarray

    def __post_init__(self):
        if len(np.intersect1d(self.keys, self.values)):
            raise ValueError("RecallAlphabet: keys and values must be disjoint token sets.")


def recall_alphabet(vocab_size: int, *, exclude: tuple[int, ...] = (), n_keys: int = 512, n_values: int = 512,
                    seed: int = 0) -> RecallAlphabet:
    """Random disjoint key and value sets drawn (fixed ``seed``) from ``range(vocab_size)`` minus ``exclude``
    (the tokenizer's special ids)."""
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, np.int64))
    if n_keys + n_values > len(pool):
        raise ValueError(f"recall_alphabet: n_keys + n_values = {n_keys + n_values} exceeds the {len(pool)} usable "
                         f"token ids of a vocabulary of {vocab_size}.")
    pick = np.random.default_rng(seed).permutation(pool)[:n_keys + n_values]
    return RecallAlphabet(keys=np.sort(pick[:n_keys]).astype(np.int32), values=np.sort(pick[n_keys:]).astype(np.int32))


def _block(alphabet: RecallAlphabet, n_pairs: int, value_len: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(block [n_pairs * (1 + value_len)], keys [n_pairs], values [n_pairs, value_len])``."""
    if not 1 <= n_pairs <= len(alphabet.keys):
        raise ValueError(f"recall block: n_pairs={n_pairs} must be in [1, {len(alphabet.keys)}] (the key alphabet).")
    keys = rng.choice(alphabet.keys, size=n_pairs, replace=False)
    values = rng.choice(alphabet.values, size=(n_pairs, value_len))
    block = np.concatenate([keys[:, None], values], axis=1).reshape(-1)
    return block.astype(np.int32), keys.astype(np.int32), values.astype(np.int32)


def recall_window(stream: np.ndarray, alphabet: RecallAlphabet, length: int, rng: np.random.Generator, *,
                  n_pairs: int = 16, n_queries: int = 16, value_len: int = 1, filler: bool = True) -> np.ndarray:
    """``length`` tokens: a block of ``n_pairs`` pairs, then ``n_queries`` queries (``key value``) of keys drawn
    from it with replacement; with ``filler`` the block and the queries sit at random places of a ``stream``
    window (the queries after the block), else the row is the block, the queries back to back and text after."""
    block, keys, values = _block(alphabet, n_pairs, value_len, rng)
    asked = rng.integers(0, n_pairs, size=n_queries)
    queries = [np.concatenate([[keys[i]], values[i]]).astype(np.int32) for i in asked]
    filler_len = length - len(block) - n_queries * (1 + value_len)
    if filler_len < 0:
        raise ValueError(f"recall_window: {n_pairs} pairs and {n_queries} queries do not fit in {length} tokens.")
    start = int(rng.integers(0, len(stream) - filler_len))
    text = stream[start:start + filler_len]
    if not filler:
        return np.concatenate([block, *queries, text]).astype(np.int32)
    cuts = np.sort(rng.integers(0, filler_len + 1, size=1 + n_queries))  # cuts[0] before the block, the rest after it
    parts, prev = [], 0
    for cut, event in zip(cuts, [block, *queries]):
        parts += [text[prev:cut], event]
        prev = cut
    parts.append(text[prev:])
    return np.concatenate(parts).astype(np.int32)


def make_recall_example(haystack: np.ndarray, alphabet: RecallAlphabet, *, context_len: int, depth: float,
                        rng: np.random.Generator, n_pairs: int = 16, value_len: int = 2) -> NeedleExample:
    """A prompt of exactly ``context_len`` tokens: a haystack window with a block of ``n_pairs`` pairs starting
    at ``round(depth * filler_len)``, ending with one key of the block; the answer is its ``value_len`` tokens.
    The key asked for does not occur in the haystack text, so the block is the only place that answers it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_recall_example: depth={depth} must be in [0, 1].")
    block, keys, values = _block(alphabet, n_pairs, value_len, rng)
    filler_len = context_len - len(block) - 1
    if filler_len < 1 or len(haystack) <= filler_len:
        raise ValueError(f"make_recall_example: context_len={context_len} does not fit {n_pairs} pairs and the "
                         "haystack.")
    start = int(rng.integers(0, len(haystack) - filler_len))
    filler = haystack[start:start + filler_len]
    in_text = np.isin(keys, filler)
    if in_text.all():
        raise ValueError("make_recall_example: every key of the block occurs in the haystack window; use a larger "
                         "key alphabet.")
    asked = int(rng.choice(np.flatnonzero(~in_text)))
    at = round(depth * filler_len)
    prompt = np.concatenate([filler[:at], block, filler[at:], [keys[asked]]]).astype(np.int32)
    return NeedleExample(prompt=prompt, answer=values[asked], needle_start=at, depth=depth)
