"""The visual question answering set: determinism, answers re-derived from the layouts and the pixels,
splits by composition and handwriting, answer balance (text-only near chance), prompt tokenization, errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jquant.data import vqa_scenes as vq
from jquant.data.emoji import load_glyphs
from jquant.data.scenes import COLORS, SPLITS, unit_split
from jquant.data.vqa_scenes import (
    QUESTION_KINDS,
    answer_vocabulary,
    vqa_items,
    vqa_scenes,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "packages/jquant-models/jquant_models/jq-llama-tiny"


@pytest.fixture(scope="module")
def glyphs():
    return load_glyphs()


@pytest.fixture(scope="module")
def seed():
    return int(np.random.default_rng().integers(1 << 20))


@pytest.fixture(scope="module")
def sets(glyphs, seed):
    """Rendered items of every split at every resolution (32 with the settings it allows)."""
    return [vqa_scenes("train", 45, 48, seed, glyphs=glyphs),
            vqa_scenes("validation", 27, 64, seed, glyphs=glyphs),
            vqa_scenes("test", 27, 32, seed, max_emoji=2, digits=(3, 4), glyphs=glyphs)]


def _items(sets):
    for s in sets:
        yield from zip(s.images, s.questions, s.answers, s.kinds, s.layouts)


def test_same_seed_same_bytes_and_prefixes(glyphs):
    a = vqa_scenes("train", 12, 48, 5, glyphs=glyphs)
    b = vqa_scenes("train", 12, 48, 5)
    assert a.images.dtype == np.uint8 and a.images.shape == (12, 48, 48, 3)
    assert a.images.tobytes() == b.images.tobytes() and (a.questions, a.answers, a.kinds) == (b.questions, b.answers,
                                                                                             b.kinds)
    assert a.layouts == b.layouts
    prefix = vqa_scenes("train", 4, 48, 5, glyphs=glyphs)
    assert prefix.images.tobytes() == a.images[:4].tobytes() and prefix.answers == a.answers[:4]
    assert a.kinds == [QUESTION_KINDS[i % len(QUESTION_KINDS)] for i in range(12)]
    assert vqa_scenes("train", 12, 48, 6, glyphs=glyphs).images.tobytes() != a.images.tobytes()


def _derive(question: str, kind: str, layout) -> str:
    """The answer to ``question`` read off the layout's cells (grid positions and names only)."""
    grid = {(c.row, c.col): c.name for c in layout.cells}
    if kind in ("left_of", "right_of", "above", "below"):
        name = re.fullmatch(r"what is just (?:left of|right of|above|below) the (.+)\?", question).group(1)
        (r, c), = [pos for pos, n in grid.items() if n == name]
        step = {"left_of": (0, -1), "right_of": (0, 1), "above": (-1, 0), "below": (1, 0)}[kind]
        return grid[(r + step[0], c + step[1])]
    if kind == "count":
        name = re.fullmatch(r"how many times does the (.+) appear\?", question).group(1)
        return str(sum(n == name for n in grid.values()))
    if kind == "background":
        return layout.background
    digits = [int(grid[(0, c)]) for c in range(len(grid))]
    if kind == "digit_at":
        return str(digits[int(re.fullmatch(r"which digit is at position (\d)\?", question).group(1)) - 1])
    return str(sum(digits)) if kind == "digit_sum" else str(len(digits))


def test_answers_follow_from_the_layout(sets):
    for _, question, answer, kind, layout in _items(sets):
        assert _derive(question, kind, layout) == answer, (question, answer)
        names = [c.name for c in layout.cells]
        if kind in ("left_of", "right_of", "above", "below", "background"):
            assert len(set(names)) == len(names)  # no repeated emoji: the named one is unique
        elif kind == "count":
            assert all(names.count(n) == 1 for n in set(names) if names.count(n) != int(answer))


def test_layout_matches_the_pixels(sets, glyphs):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for image, _, _, kind, layout in _items(sets):
        r = layout.resolution
        rows, cols = layout.grid
        assert image.shape == (r, r, 3) and len(layout.cells) == rows * cols
        drawn = np.zeros((r, r), bool)
        for c in layout.cells:
            # each item lies inside its own grid cell (an axis with one cell may use the whole image)
            for start, index, count in ((c.top, c.row, rows), (c.left, c.col, cols)):
                lo, hi = (0, r) if count == 1 else (round(index * r / count), round((index + 1) * r / count))
                assert lo <= start and start + c.size <= hi
            assert c.size >= (vq.MIN_EMOJI_PX if layout.kind == "emoji" else vq.DIGIT_PX)
            if layout.kind == "emoji":
                assert glyphs.names[c.source] == c.name
            else:
                assert str(targets[c.source]) == c.name  # the handwriting shows the stated digit
            box = image[c.top : c.top + c.size, c.left : c.left + c.size].astype(int)
            assert np.abs(box - COLORS[layout.background]).max() > 60  # something is drawn in every box
            drawn[c.top : c.top + c.size, c.left : c.left + c.size] = True
        np.testing.assert_array_equal(image[~drawn], np.broadcast_to(COLORS[layout.background], image[~drawn].shape))
        assert (kind in vq.DIGIT_KINDS) == (layout.kind == "digits")


def _units(layout, held_out):
    names = sorted({c.name for c in layout.cells})
    if layout.kind == "digits":
        return [unit_split("digits/" + "".join(c.name for c in layout.cells))]
    if len(names) == 1:
        return [2 if names[0] in held_out else unit_split(f"single/{names[0]}/{layout.background}")]
    return [2 if a in held_out or b in held_out else unit_split(f"pair/{a}/{b}")
            for i, a in enumerate(names) for b in names[i + 1:]]


def test_splits_hold_out_compositions_and_handwriting(glyphs, seed):
    per_split = {s: vqa_items(s, 180, 48, seed, vocabulary="all", glyphs=glyphs)[0] for s in SPLITS}
    strings, samples = {}, {}
    for index, split in enumerate(SPLITS):
        for layout in per_split[split]:
            assert layout.split == split
            units = _units(layout, glyphs.held_out)
            assert max(units) == index  # train: only train units; held out: a unit of that split, none later
            if layout.kind == "digits":
                strings.setdefault(split, set()).add("".join(c.name for c in layout.cells))
                samples.setdefault(split, set()).update(c.source for c in layout.cells)
            elif split != "test":
                assert not {c.name for c in layout.cells} & glyphs.held_out
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not strings[a] & strings[b] and not samples[a] & samples[b]
    assert any({c.name for lay in per_split["test"] for c in lay.cells} & glyphs.held_out)


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_balanced_and_text_only_is_near_chance(split, seed):
    """Per kind, over ``m`` items: every answer's share is ``1 / |answers| ± 4.5`` binomial standard deviations
    (so the majority answer's share is at most that bound; a few answers a held-out split cannot show may be
    missing), and a text-only model fit on train items of another seed is no better than that bound."""
    m = 600
    _, questions, answers, kinds = vqa_items(split, m * len(QUESTION_KINDS), 48, seed)
    fit = vqa_items("train", m * len(QUESTION_KINDS), 48, seed + 1)[1:]
    text_only = vq.text_only_baseline(fit, (questions, answers, kinds))
    majority = vq.majority_baselines(answers, kinds)
    for kind in QUESTION_KINDS:
        vocab = answer_vocabulary(kind)
        counts = Counter(a for a, k in zip(answers, kinds) if k == kind)
        assert sum(counts.values()) == m and set(counts) <= set(vocab)
        p = 1 / len(vocab)
        tolerance = 4.5 * np.sqrt(p * (1 - p) / m)
        shares = np.array([counts[a] / m for a in vocab])
        assert shares.max() <= p + tolerance, (kind, counts.most_common(3))
        assert (shares < p - tolerance).sum() <= (0 if split == "train" else 2), (kind, sorted(counts.items()))
        assert counts[majority[kind].answer] == max(counts.values())
        assert majority[kind].share == pytest.approx(shares.max())
        assert text_only[kind] <= p + tolerance, (kind, text_only[kind])


def test_prompt_and_answers_tokenize_cleanly(glyphs):
    """The answer's tokens follow the prompt's unchanged, and decode back to the exact answer."""
    from jquant.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    prompt = vq.format_prompt("what is just left of the frog?", image_placeholder="<img>")
    assert prompt.startswith("<img>") and "what is just left of the frog?" in prompt
    assert vq.format_prompt("q?") != vq.format_prompt("q?", image_placeholder="<x>")
    head = tokenizer.encode(prompt, add_special_tokens=False)
    for kind in QUESTION_KINDS:
        for answer in answer_vocabulary(kind, glyphs=glyphs):
            ids = tokenizer.encode(f"{prompt} {answer}", add_special_tokens=False)
            assert ids[: len(head)] == head and tokenizer.decode(ids[len(head):]) == f" {answer}"


def test_bad_arguments_name_the_fix(glyphs):
    cases = [({"split": "dev"}, "split"), ({"n": 0}, "n must"), ({"n": 2.5}, "n must"), ({"seed": -1}, "seed"),
             ({"resolution": 40}, "resolution must"), ({"resolution": 32}, "max_emoji <= 2"),
             ({"resolution": 32, "max_emoji": 2}, "digits of at most 4"), ({"kinds": ["colour"]}, "kinds"),
             ({"kinds": "count"}, "kinds"), ({"max_emoji": 5}, "max_emoji"), ({"digits": (2,)}, "digits"),
             ({"vocabulary": ["frog", "sun", "banana"]}, "max_emoji + 1")]
    for overrides, message in cases:
        args = {"split": "train", "n": 3, "resolution": 48, "seed": 0} | overrides
        with pytest.raises(ValueError, match=re.escape(message)):
            vqa_items(args.pop("split"), args.pop("n"), glyphs=glyphs, **args)
    assert vqa_items("train", 3, 32, kinds=["digit_sum"], digits=(3, 4), glyphs=glyphs)[2]  # what 32 px allows
    with pytest.raises(ValueError, match="kind must"):
        answer_vocabulary("colour")


def test_contact_sheet(tmp_path):
    from PIL import Image

    path = vq.contact_sheet(tmp_path / "sheet.png", n=4, columns=2, tile=96)
    with Image.open(path) as image:
        assert image.size[0] == 6 + 2 * (96 + 6) and image.size[1] > 2 * 96
