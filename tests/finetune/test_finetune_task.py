"""The source-attribution fine-tuning task: items, training rows and their loss mask."""

import collections

import numpy as np
import pytest

from jquant.data.tokenizer import load_tokenizer
from jquant.finetune.task import source_items, supervised_rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_items_are_balanced_and_short():
    items = source_items(("validation", "test"), 30, 0, context_chars=120)
    assert collections.Counter(i.label for i in items) == {0: 10, 1: 10, 2: 10}
    assert all(i.context.endswith("\nThis passage is from") for i in items)
    with pytest.raises(ValueError, match="do not pool the train split"):
        source_items(("train", "test"), 3, 0)


def test_rows_mask_exactly_the_answer_tokens(tokenizer):
    items = source_items("train", 12, 1)
    tokens, mask = supervised_rows(items, tokenizer, 96)
    assert tokens.shape == (12, 97) and mask.shape == (12, 96)
    for item, row, m in zip(items, tokens, mask):
        answer = tokenizer.decode(row[1:][m])
        assert answer == item.choices[item.label]
        assert row[0] == tokenizer.eos_token_id
        assert tokenizer.decode(row[1:np.argmax(m) + 1]) == item.context  # context precedes the answer


def test_long_contexts_are_left_truncated(tokenizer):
    items = source_items("train", 6, 2, context_chars=400)
    tokens, mask = supervised_rows(items, tokenizer, 16)
    for item, row, m in zip(items, tokens, mask):
        assert tokenizer.decode(row[1:][m]) == item.choices[item.label]
        assert tokenizer.pad_token_id not in row  # every 400-character excerpt overflows 16 tokens
        assert m[-int(m.sum()):].all()  # so the context was cut on the left and the answer ends the row
    with pytest.raises(ValueError, match="seq_len"):
        supervised_rows(items, tokenizer, 1)
