"""Needle prompts and training rows built from token streams: placement, lengths and answers."""

import numpy as np
import pytest

from jquant.data.needle import (NeedlePieces, make_example, make_passage_example, repeat_window,
                                training_window)

PIECES = NeedlePieces(keys=(np.array([900, 901, 902]), np.array([900, 903])), space=904,
                      digits=np.arange(910, 920), period=905)
STREAM = np.arange(2000, dtype=np.int32) % 500  # haystack tokens never collide with needle tokens


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if np.array_equal(seq[i:i + len(sub)], sub)]


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_example_holds_needle_at_depth_and_ends_with_question(depth):
    ex = make_example(STREAM, PIECES, context_len=200, depth=depth, rng=np.random.default_rng(1))
    assert len(ex.prompt) == 200 and len(ex.answer) == 4 and np.all(np.isin(ex.answer, PIECES.digits))
    name = next(i for i, k in enumerate(PIECES.keys) if np.array_equal(ex.prompt[-len(k) - 1:-1], k))
    needle = np.concatenate([PIECES.keys[name], [PIECES.space], ex.answer, [PIECES.period]])
    assert _find(ex.prompt, needle) == [ex.needle_start]
    filler = 200 - len(needle) - len(PIECES.keys[name]) - 1
    assert ex.needle_start == round(depth * filler)
    with pytest.raises(ValueError, match="depth"):
        make_example(STREAM, PIECES, context_len=200, depth=1.5, rng=np.random.default_rng(0))


def test_passage_example_answer_continues_the_inserted_passage():
    source = np.arange(1000, 1100, dtype=np.int32)
    ex = make_passage_example(STREAM, source, context_len=150, depth=0.5, rng=np.random.default_rng(2))
    assert len(ex.prompt) == 150
    passage = ex.prompt[ex.needle_start:ex.needle_start + 20]
    np.testing.assert_array_equal(ex.prompt[-12:], passage[:12])
    np.testing.assert_array_equal(ex.answer, passage[12:])


def test_training_rows_put_every_fact_before_its_repeat():
    row = training_window(STREAM, PIECES, 300, np.random.default_rng(3), n_needles=2)
    assert len(row) == 300
    for k in PIECES.keys:
        hits = _find(row, np.concatenate([k, [PIECES.space]]))
        assert len(hits) == 2  # the needle and, later, its question with the same digits
        np.testing.assert_array_equal(row[hits[0] + len(k) + 1:hits[0] + len(k) + 5],
                                      row[hits[1] + len(k) + 1:hits[1] + len(k) + 5])
    row = repeat_window(np.arange(3000, 6000, dtype=np.int32), 400, np.random.default_rng(4), n_passages=3)
    assert len(row) == 400 and len(np.unique(row)) < 400  # passages occur twice


def test_scrambled_repeat_rows_repeat_each_drawn_passage_verbatim():
    stream = np.arange(3000, 6000, dtype=np.int32)  # distinct tokens: any repeated run is a copied passage
    row = repeat_window(stream, 500, np.random.default_rng(5), n_passages=2, passage_len=(30, 30), scrambled=True)
    assert len(row) == 500 and set(row.tolist()) <= set(stream.tolist())
    windows = np.lib.stride_tricks.sliding_window_view(row, 30)
    same = (windows[:, None, :] == windows[None, :, :]).all(-1) & ~np.eye(len(windows), dtype=bool)
    repeats = [windows[i] for i, j in zip(*np.nonzero(same)) if i < j]
    assert len(repeats) == 2  # each passage occurs exactly twice
    for passage in repeats:  # drawn independently, not a run of the (ascending) stream
        assert not np.all(np.diff(passage) == 1)
