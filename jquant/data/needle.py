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


def training_window(stream: np.ndarray, pieces: NeedlePieces, length: int, rng: np.random.Generator,
                    n_digits: int = 4) -> np.ndarray:
    """``length`` tokens of ``stream`` with a needle at a random place and its question + answer later."""
    name = int(rng.integers(len(pieces.keys)))
    value = rng.integers(0, 10, size=n_digits)
    needle, question = pieces.needle(name, value), pieces.question(name)
    qa = np.concatenate([question, pieces.digits[value], [pieces.period]])
    filler_len = length - len(needle) - len(qa)
    start = int(rng.integers(0, len(stream) - filler_len))
    filler = stream[start:start + filler_len]
    at_needle = int(rng.integers(0, filler_len))
    at_question = int(rng.integers(at_needle, filler_len + 1))
    return np.concatenate([filler[:at_needle], needle, filler[at_needle:at_question], qa,
                           filler[at_question:]]).astype(np.int32)
