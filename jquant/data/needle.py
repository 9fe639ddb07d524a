"""Needle-in-a-haystack retrieval built from the corpus: a fact inserted at a chosen depth, asked for at the end.

A needle is the sentence ``"The secret number of <name> is <d1><d2><d3><d4>."`` with random
digits; the prompt is a corpus passage of exactly ``context_len`` tokens that holds the needle at
``depth`` (0 = start, 1 = just before the question) and ends with the question
``"The secret number of <name> is "``. The model answers by continuing the prompt; the answer
is correct when every digit is. Digits are single tokens of the bundled tokenizer, so the
answer is ``n_digits`` tokens.

The same pieces build training sequences (``training_window``): a haystack window with a
needle at a random position and its question plus answer at a random later position, which
is how ``jq-llama-long`` learns to retrieve over its whole context.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMES = (
    "Mercutio", "Horatio", "Ophelia", "Benvolio", "Prospero", "Miranda", "Bassanio", "Portia",
    "Orsino", "Viola", "Malvolio", "Rosalind", "Orlando", "Lysander", "Hermia", "Helena",
    "Antonio", "Sebastian", "Cordelia", "Edmund", "Duncan", "Banquo", "Cassio", "Iago",
)
KEY_TEMPLATE = "The secret number of {name} is"


@dataclasses.dataclass(frozen=True)
class NeedlePieces:
    """Token ids: one key prefix per name (``KEY_TEMPLATE``), the space, the ten digits and the period."""

    keys: tuple[np.ndarray, ...]
    space: int
    digits: np.ndarray
    period: int

    def needle(self, name: int, value: np.ndarray) -> np.ndarray:
        """``key + " " + digits + "."``: the fact inserted into the haystack."""
        return np.concatenate([self.keys[name], [self.space], self.digits[value], [self.period]]).astype(np.int32)

    def question(self, name: int) -> np.ndarray:
        """``key + " "``: the prompt's last tokens; the answer follows."""
        return np.concatenate([self.keys[name], [self.space]]).astype(np.int32)


def needle_pieces(tokenizer: "PreTrainedTokenizerBase") -> NeedlePieces:
    """Encodes the needle parts with ``tokenizer``; raises if digits are not single tokens."""

    def single(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"needle_pieces: {text!r} is not a single token of this tokenizer ({ids}).")
        return ids[0]

    keys = tuple(np.array(tokenizer.encode(KEY_TEMPLATE.format(name=n), add_special_tokens=False), np.int32)
                 for n in NAMES)
    return NeedlePieces(keys=keys, space=single(" "), digits=np.array([single(str(d)) for d in range(10)], np.int32),
                        period=single("."))


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    """``prompt [context_len]`` ending with the question; ``answer [n_digits]``; where the needle starts."""

    prompt: np.ndarray
    answer: np.ndarray
    needle_start: int
    depth: float


def make_example(haystack: np.ndarray, pieces: NeedlePieces, *, context_len: int, depth: float,
                 rng: np.random.Generator, n_digits: int = 4) -> NeedleExample:
    """A retrieval prompt of exactly ``context_len`` tokens cut from a random place of ``haystack``.

    The needle starts at ``round(depth * (room))`` tokens into the filler, where ``room`` is the
    filler length; the question is the last ``len(key) + 1`` tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_example: depth={depth} must be in [0, 1].")
    name = int(rng.integers(len(pieces.keys)))
    value = rng.integers(0, 10, size=n_digits)
    needle, question = pieces.needle(name, value), pieces.question(name)
    filler_len = context_len - len(needle) - len(question)
    if filler_len < 1:
        raise ValueError(f"make_example: context_len={context_len} is too short for a needle and a question.")
    if len(haystack) <= filler_len:
        raise ValueError(f"make_example: the haystack has {len(haystack)} tokens; need more than {filler_len}.")
    start = int(rng.integers(0, len(haystack) - filler_len))
    filler = haystack[start:start + filler_len]
    at = int(round(depth * filler_len))
    prompt = np.concatenate([filler[:at], needle, filler[at:], question]).astype(np.int32)
    return NeedleExample(prompt=prompt, answer=pieces.digits[value].astype(np.int32), needle_start=at, depth=depth)


def _interleave(stream: np.ndarray, length: int, pairs: list[tuple[np.ndarray, np.ndarray]],
                rng: np.random.Generator, what: str) -> np.ndarray:
    """``length`` tokens: a random ``stream`` window with each pair's first part placed before its second part,
    all parts at random positions of the filler."""
    order = rng.permutation(2 * len(pairs))  # event slots; the earlier slot of each pair gets the first part
    slots = [None] * (2 * len(pairs))
    for i, (first, second) in enumerate(pairs):
        a, b = sorted(order[2 * i:2 * i + 2])
        slots[a], slots[b] = first, second
    filler_len = length - sum(len(x) for x in slots)
    if filler_len < 0:
        raise ValueError(f"{what}: {len(pairs)} pairs do not fit in {length} tokens.")
    start = int(rng.integers(0, len(stream) - filler_len))
    filler = stream[start:start + filler_len]
    cuts = np.sort(rng.integers(0, filler_len + 1, size=len(slots)))
    parts, prev = [], 0
    for cut, event in zip(cuts, slots):
        parts += [filler[prev:cut], event]
        prev = cut
    parts.append(filler[prev:])
    return np.concatenate(parts).astype(np.int32)


def training_window(stream: np.ndarray, pieces: NeedlePieces, length: int, rng: np.random.Generator,
                    n_digits: int = 4, n_needles: int = 1) -> np.ndarray:
    """``length`` tokens of ``stream`` holding ``n_needles`` needles (distinct names), each followed later in
    the window by its question and answer; the events are spread at random positions of the filler."""
    if not 1 <= n_needles <= len(pieces.keys):
        raise ValueError(f"training_window: n_needles={n_needles} must be in [1, {len(pieces.keys)}].")
    pairs = []
    for name in rng.choice(len(pieces.keys), size=n_needles, replace=False):
        value = rng.integers(0, 10, size=n_digits)
        qa = np.concatenate([pieces.question(int(name)), pieces.digits[value], [pieces.period]])
        pairs.append((pieces.needle(int(name), value), qa))
    return _interleave(stream, length, pairs, rng, "training_window")


def make_passage_example(haystack: np.ndarray, source: np.ndarray, *, context_len: int, depth: float,
                         rng: np.random.Generator, prefix: int = 12, n_answer: int = 8) -> NeedleExample:
    """Passage recall: ``prefix + n_answer`` tokens of ``source`` inserted at ``depth`` of a haystack window;
    the prompt ends with the passage's first ``prefix`` tokens and the answer is its next ``n_answer``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_passage_example: depth={depth} must be in [0, 1].")
    s = int(rng.integers(0, len(source) - prefix - n_answer))
    passage = source[s:s + prefix + n_answer]
    filler_len = context_len - len(passage) - prefix
    if filler_len < 1 or len(haystack) <= filler_len:
        raise ValueError(f"make_passage_example: context_len={context_len} does not fit the passage and haystack.")
    start = int(rng.integers(0, len(haystack) - filler_len))
    filler = haystack[start:start + filler_len]
    at = int(round(depth * filler_len))
    prompt = np.concatenate([filler[:at], passage, filler[at:], passage[:prefix]]).astype(np.int32)
    return NeedleExample(prompt=prompt, answer=passage[prefix:].astype(np.int32), needle_start=at, depth=depth)


def repeat_window(stream: np.ndarray, length: int, rng: np.random.Generator, n_passages: int = 4,
                  passage_len: tuple[int, int] = (24, 48), scrambled: bool = False) -> np.ndarray:
    """``length`` tokens of ``stream`` where ``n_passages`` passages each occur twice, the repeat later in the
    window: training rows that teach recall over the context.

    A passage is a run of ``stream`` from a random place, or with ``scrambled`` tokens drawn independently
    from ``stream`` (its unigram distribution): then nothing but copying predicts the repeat, the plainest
    signal for forming induction heads.
    """
    pairs = []
    for _ in range(n_passages):
        n = int(rng.integers(passage_len[0], passage_len[1] + 1))
        if scrambled:
            passage = stream[rng.integers(0, len(stream), size=n)]
        else:
            s = int(rng.integers(0, len(stream) - n))
            passage = stream[s:s + n]
        pairs.append((passage, passage))
    return _interleave(stream, length, pairs, rng, "repeat_window")
