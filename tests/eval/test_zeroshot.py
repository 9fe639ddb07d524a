"""Multiple-choice scoring against references, tie behaviour, and task builders."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.data import EOS, SOURCES, load_split, load_tokenizer
from jquant.eval.zeroshot import (
    SOURCE_CHOICES,
    TASKS,
    MultipleChoiceItem,
    choice_scores,
    evaluate_multiple_choice,
    zero_shot,
)

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
V = 3 + len(ALPHABET)


class CharTokenizer:
    """ids 0..2: bos/eos/pad; then one id per character of ``ALPHABET``."""

    eos_token_id = 1
    pad_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ALPHABET.index(c) for c in text]


def _successor(token: jax.Array) -> jax.Array:
    """Id of the next letter (z -> a); non-letters map to 'a'."""
    letter = token - 4  # 'a' is id 4
    return jnp.where((letter >= 0) & (letter < 26), (letter + 1) % 26, 0) + 4


def oracle(tokens: jax.Array) -> jax.Array:
    """Puts a huge logit on the next letter of the alphabet."""
    return 50.0 * jax.nn.one_hot(_successor(tokens), V)


def uniform(tokens: jax.Array) -> jax.Array:
    return jnp.zeros(tokens.shape + (V,))


def _chain(start: str, n: int) -> str:
    i = ALPHABET.index(start) - 1
    return "".join(ALPHABET[1 + (i + k) % 26] for k in range(n))


def _random_items(seed: int, n: int = 12) -> list[MultipleChoiceItem]:
    """Context, then the alphabet continues in the true choice and never in the others."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        context = "".join(rng.choice(list(ALPHABET[1:]), rng.integers(1, 9)))
        first = ALPHABET[1 + (ALPHABET.index(context[-1]) % 26)]
        answer = _chain(first, int(rng.integers(1, 6)))
        wrong = [ALPHABET[1 + (ALPHABET.index(first) + 1 + k) % 26] * int(rng.integers(1, 6))
                 for k in range(3)]
        label = int(rng.integers(4))
        items.append(MultipleChoiceItem(context, wrong[:label] + [answer] + wrong[label:], label))
    return items


def test_oracle_scores_100_percent() -> None:
    result = evaluate_multiple_choice(oracle, CharTokenizer(), _random_items(0), batch_size=4,
                                      progress=False)
    assert (result.accuracy, result.acc_norm, result.n) == (1.0, 1.0, 12)


def test_uniform_model_tie_behaviour() -> None:
    items = _random_items(1, n=20)
    result = evaluate_multiple_choice(uniform, CharTokenizer(), items, progress=False)
    shortest_first = [int(np.argmin([len(c) for c in item.choices])) for item in items]
    assert result.accuracy == np.mean([i.label == s for i, s in zip(items, shortest_first)])
    assert result.acc_norm == np.mean([i.label == 0 for i in items])
    assert evaluate_multiple_choice(uniform, CharTokenizer(), items, normalize="none",
                                    progress=False).acc_norm is None


def _bigram(seed: int):
    table = jnp.asarray(np.random.default_rng(seed).normal(size=(V, V)) * 2, jnp.float32)
    return table, lambda tokens: table[tokens]


def test_scores_match_float64_reference_and_do_not_depend_on_batching() -> None:
    table, model = _bigram(2)
    tok, items = CharTokenizer(), _random_items(3)
    batched = choice_scores(model, tok, items, batch_size=5)
    for item, (sums, counts) in zip(items, batched):
        alone_sums, alone_counts = choice_scores(model, tok, [item], batch_size=1)[0]
        np.testing.assert_allclose(sums, alone_sums, rtol=1e-5)
        np.testing.assert_array_equal(counts, alone_counts)
        for choice, score, count in zip(item.choices, sums, counts):
            seq = [1] + tok.encode(item.context) + tok.encode(choice)
            logits = np.asarray(table, np.float64)[seq[:-1]]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            ref = sum(logp[t - 1, seq[t]] for t in range(len(seq) - len(choice), len(seq)))
            np.testing.assert_allclose(score, ref, rtol=1e-5)
            assert count == len(choice)


def test_max_len_truncates_context_from_the_left() -> None:
    _, model = _bigram(4)
    item = MultipleChoiceItem("abcdefghij", ["kl", "zz"], 0)
    full = choice_scores(model, CharTokenizer(), [item])[0][0]
    short = choice_scores(model, CharTokenizer(), [item], max_len=4)[0][0]
    np.testing.assert_allclose(full, short, rtol=1e-6)  # a bigram only sees the last token
    with pytest.raises(ValueError, match="max_len=2"):
        choice_scores(model, CharTokenizer(), [item], max_len=2)


def test_item_and_argument_validation() -> None:
    with pytest.raises(ValueError, match="label=2 out of range"):
        MultipleChoiceItem("a", ["b", "c"], 2)
    with pytest.raises(ValueError, match="at least 2"):
        MultipleChoiceItem("a", ["b"], 0)
    with pytest.raises(ValueError, match="normalize"):
        evaluate_multiple_choice(oracle, CharTokenizer(), _random_items(0), normalize="byte")
    with pytest.raises(ValueError, match="unknown tasks"):
        zero_shot(oracle, CharTokenizer(), tasks=("hellaswag",))


# ------------------------------------------------------------------- task builders


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_builders_are_deterministic_balanced_and_valid(task, test_split) -> None:
    items = TASKS[task](test_split, 60, 0)
    assert items == TASKS[task](test_split, 60, 0)
    assert items != TASKS[task](test_split, 60, 1)
    assert len(items) == 60
    n_choices = len(items[0].choices)
    counts = Counter(item.label for item in items)
    assert set(counts) == set(range(n_choices))
    assert max(counts.values()) - min(counts.values()) <= 1
    for item in items:
        assert len(set(item.choices)) == len(item.choices) == n_choices  # distractors != answer


@pytest.fixture(scope="module")
def labelled(test_split) -> list[tuple[str, str]]:
    """(text, source) of every passage of the test split."""
    return list(zip(test_split["text"], test_split["source"]))


def _source_of(passage_prefix: str, labelled: list[tuple[str, str]]) -> str:
    sources = {s for t, s in labelled if t.startswith(passage_prefix)}
    assert len(sources) == 1
    return sources.pop()


def test_next_line_answer_follows_its_context(test_split) -> None:
    passages = list(test_split["text"])
    for item in TASKS["next_line"](test_split, 30, 0):
        answer = item.choices[item.label]
        assert any(item.context + answer in p for p in passages)
        assert not any(item.context + c in p for p in passages for c in item.choices
                       if c != answer)


def test_source_label_names_the_passage_source(test_split, labelled) -> None:
    for item in TASKS["source"](test_split, 30, 0):
        assert item.context.endswith("\nThis passage is from")
        excerpt = item.context.removesuffix("\nThis passage is from")
        source = _source_of(excerpt, labelled)
        assert item.choices[item.label] == SOURCE_CHOICES[source]


def test_same_source_answer_shares_the_context_source(test_split, labelled) -> None:
    for item in TASKS["same_source"](test_split, 30, 0):
        assert item.context.endswith(EOS)
        source = _source_of(item.context.removesuffix(EOS), labelled)
        choice_sources = [_source_of(c, labelled) for c in item.choices]
        assert sorted(choice_sources) == sorted(SOURCES)
        assert choice_sources[item.label] == source


def test_builders_reject_too_many_items(test_split) -> None:
    with pytest.raises(ValueError, match="n_items asks for"):
        TASKS["source"](test_split, 100_000, 0)


class TinyLM(nnx.Module):
    def __init__(self, vocab: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.out = nnx.Linear(8, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.out(self.embed(tokens))


def test_zero_shot_end_to_end_with_bundled_tokenizer() -> None:
    tokenizer = load_tokenizer()
    results = zero_shot(TinyLM(len(tokenizer), nnx.Rngs(0)), tokenizer, tasks=tuple(TASKS),
                        n_items=6, batch_size=8, progress=False)
    assert set(results) == set(TASKS)
    for result in results.values():
        assert result.n == 6 and 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.acc_norm <= 1.0
