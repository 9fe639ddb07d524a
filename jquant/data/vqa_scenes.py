"""Visual question answering built offline: emoji grids and handwritten digit strips with questions whose
short answers need both the image and the question (pure numpy; layouts in :mod:`jquant.data.vqa_layouts`).

Question kinds (:data:`QUESTION_KINDS`) and their exact-match answers (:func:`answer_vocabulary`)::

    left_of / right_of   "what is just left of the frog?"      -> an emoji name ("red apple")
    above / below        "what is just below the frog?"        -> an emoji name
    count                "how many times does the frog appear?" -> "1" .. str(max_emoji)
    background           "what color is the background?"       -> a colour name of scenes.COLORS
    digit_at             "which digit is at position 2?"       -> "0" .. "9" (positions count from 1 at the left)
    digit_sum            "what is the sum of the digits?"      -> "0" .. str(9 max(digits))
    digit_count          "how many digits are there?"          -> str(k) for k in ``digits``

"Just left of X" is the emoji in the grid cell next to X's on that side (same row or column); the named
emoji occurs once in positional scenes, and every emoji of a scene is distinct except the counted one.

Text-only balance: every item draws its answer first, uniformly from its kind's answer vocabulary, then a
scene that has that answer, with the other words of the question (the named emoji, the position) drawn
independently of the answer. So, per kind, every answer is equally likely and the question text says
nothing about which: a text-only model is at chance (``1 / |answers|``: 1/32 for the positional kinds with
``"reference-32"``, 1/4 count, 1/10 background and digit_at, 1/46 digit_sum, 1/3 digit_count). Splits
perturb this a little: a scene is redrawn (answer kept) until it belongs to the requested split, and an
answer no scene of that split can have (e.g. sum 0 when every all-zero string is held out) is redrawn after
:data:`MAX_SCENE_TRIES`. Within a held-out split the named emoji and the answer often form that split's
held-out pair, so a text-only model fit on held-out items would beat chance (about 0.07 for the positional
kinds on test); one fit on train, as a model is, does not (about 0.04 on train, 0.03 on test).
:func:`majority_baselines` and :func:`text_only_baseline` measure this (``python -m jquant.data.vqa_scenes
baselines``).

Splits (train / validation / test) hold out compositions and handwriting as described in
:mod:`jquant.data.vqa_layouts` (emoji units shared with :mod:`jquant.data.scenes`). Items are deterministic
from ``np.random.default_rng([seed, split index])``; kinds are assigned round-robin (item ``i`` has kind
``kinds[i % len(kinds)]``), and the first ``m`` of ``n`` items equal the ``m`` items of the call with ``n=m``.

Images are ``R x R`` with ``R`` in :data:`RESOLUTIONS` (default 48: a 12x12 grid of 4-pixel patches; emoji
are at least 12 px, digits 8 px, so 32 pixels allow ``max_emoji=2`` and ``digits=(3, 4)``). Train a model on
:func:`format_prompt` followed by ``" " + answer``. ``python -m jquant.data.vqa_scenes sheet --out PNG``
draws examples; ``... baselines`` prints the text-only baselines.
"""

from __future__ import annotations

import functools
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jquant.data.emoji import Glyphs, load_glyphs
from jquant.data.scenes import COLORS, SPLITS, _is_int, vocabulary_ids
from jquant.data.vqa_layouts import (
    DIGIT_PX,
    MIN_EMOJI_PX,
    VQALayout,
    digit_layout,
    digit_string_split,
    emoji_layout,
    emoji_units,
    ink_pairs,
    load_digit_images,
    render_layout,
    visible_on,
)

RESOLUTIONS = (32, 48, 64)
EMOJI_KINDS = ("left_of", "right_of", "above", "below", "count", "background")
DIGIT_KINDS = ("digit_at", "digit_sum", "digit_count")
QUESTION_KINDS = EMOJI_KINDS + DIGIT_KINDS
DIGIT_COUNTS = (3, 4, 5)
NEIGHBOURS = {"left_of": (0, -1, "left of"), "right_of": (0, 1, "right of"), "above": (-1, 0, "above"),
              "below": (1, 0, "below")}  # (row step, column step from the named emoji to the answer, words)
MAX_SCENE_TRIES = 200  # scenes drawn for one answer before the answer is redrawn
MAX_ANSWER_TRIES = 50
PROMPT = "{image} question: {question} answer:"


class VQAScenes(NamedTuple):
    """``images [n, R, R, 3]`` uint8, ``questions``, exact-match ``answers``, question ``kinds`` and the
    ``layouts`` (ground truth: every cell's grid position, box, name and source)."""

    images: np.ndarray
    questions: list[str]
    answers: list[str]
    kinds: list[str]
    layouts: list[VQALayout]


class _Config(NamedTuple):
    resolution: int
    split: int
    vocab: tuple[int, ...]
    glyphs: Glyphs
    max_emoji: int
    digits: tuple[int, ...]
    visible: np.ndarray  # [len(vocab), len(COLORS)] bool, vqa_layouts.visible_on


# ------------------------------------------------------------------------ answers


def answer_vocabulary(kind: str, *, vocabulary: str | Sequence[str | int] = "reference-32", max_emoji: int = 4,
                      digits: Sequence[int] = DIGIT_COUNTS, glyphs: Glyphs | None = None) -> tuple[str, ...]:
    """Every answer a ``kind`` question can have, in a fixed order (answers are drawn uniformly from it)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}.")
    if kind in NEIGHBOURS:
        glyphs = glyphs or load_glyphs()
        return tuple(glyphs.names[g] for g in vocabulary_ids(vocabulary, glyphs))
    return {"count": lambda: tuple(str(m) for m in range(1, max_emoji + 1)),
            "background": lambda: tuple(COLORS),
            "digit_at": lambda: tuple(str(d) for d in range(10)),
            "digit_sum": lambda: tuple(str(s) for s in range(9 * max(digits) + 1)),
            "digit_count": lambda: tuple(str(k) for k in sorted(digits))}[kind]()


def format_prompt(question: str, image_placeholder: str = "<image>") -> str:
    """The model's input text: :data:`PROMPT` with the image placeholder (whatever token(s) the model puts
    its image embeddings at) and the question; the target that follows is ``" " + answer``."""
    return PROMPT.format(image=image_placeholder, question=question)


# ------------------------------------------------------------------------ emoji scenes

_Draft = tuple[tuple[int, int], list[int], str]  # (grid, vocabulary positions row-major, question)


def _grids(max_emoji: int, slots: int, need: tuple[int, int] = (0, 0)) -> list[tuple[int, int]]:
    """Rows ``1 x k``, columns ``k x 1`` and the ``2 x 2`` grid (if ``max_emoji >= 4``) with at least ``slots``
    cells and room for a neighbour ``need`` = (row step, column step)."""
    grids = [(1, k) for k in range(1, max_emoji + 1)] + [(k, 1) for k in range(2, max_emoji + 1)]
    grids += [(2, 2)] if max_emoji >= 4 else []
    return [g for g in grids if g[0] * g[1] >= slots and g[0] > abs(need[0]) and g[1] > abs(need[1])]


def _others(rng: np.random.Generator, cfg: _Config, exclude: list[int], count: int) -> list[int]:
    """``count`` distinct vocabulary positions not in ``exclude``."""
    rest = np.setdiff1d(np.arange(len(cfg.vocab)), exclude)
    return [int(x) for x in rng.choice(rest, size=count, replace=False)]


def _emoji_positional(rng: np.random.Generator, cfg: _Config, kind: str, answer: str) -> _Draft:
    dr, dc, words = NEIGHBOURS[kind]
    grids = _grids(cfg.max_emoji, 2, (dr, dc))
    rows, cols = grids[rng.integers(len(grids))]
    a = [cfg.glyphs.names[g] for g in cfg.vocab].index(answer)
    (x,) = _others(rng, cfg, [a], 1)
    slots = [(r, c) for r in range(rows) for c in range(cols) if 0 <= r + dr < rows and 0 <= c + dc < cols]
    r, c = slots[rng.integers(len(slots))]
    labels = dict.fromkeys(((i, j) for i in range(rows) for j in range(cols)), -1)
    labels[(r, c)], labels[(r + dr, c + dc)] = x, a
    fill = iter(_others(rng, cfg, [a, x], rows * cols - 2))
    grid_labels = [lab if lab >= 0 else next(fill) for lab in labels.values()]
    name = cfg.glyphs.names[cfg.vocab[x]]
    return (rows, cols), grid_labels, f"what is just {words} the {name}?"


def _emoji_count(rng: np.random.Generator, cfg: _Config, kind: str, answer: str) -> _Draft:
    m = int(answer)
    grids = _grids(cfg.max_emoji, m)
    rows, cols = grids[rng.integers(len(grids))]
    x = int(rng.integers(len(cfg.vocab)))
    fill = iter(_others(rng, cfg, [x], rows * cols - m))
    chosen = set(rng.choice(rows * cols, size=m, replace=False).tolist())
    grid_labels = [x if i in chosen else next(fill) for i in range(rows * cols)]
    return (rows, cols), grid_labels, f"how many times does the {cfg.glyphs.names[cfg.vocab[x]]} appear?"


def _emoji_background(rng: np.random.Generator, cfg: _Config, kind: str, answer: str) -> _Draft:
    grids = _grids(cfg.max_emoji, 1)
    rows, cols = grids[rng.integers(len(grids))]
    return (rows, cols), _others(rng, cfg, [], rows * cols), "what color is the background?"


def _emoji_item(rng: np.random.Generator, cfg: _Config, kind: str, answer: str) -> tuple[VQALayout, str] | None:
    draw = _emoji_background if kind == "background" else _emoji_count if kind == "count" else _emoji_positional
    grid, labels, question = draw(rng, cfg, kind, answer)
    colours = np.flatnonzero(cfg.visible[labels].all(axis=0))  # backgrounds every emoji stands out from
    if kind == "background":
        background = answer
        if list(COLORS).index(answer) not in colours:
            return None
    elif len(colours):
        background = list(COLORS)[colours[rng.integers(len(colours))]]
    else:
        return None
    ids = [cfg.vocab[lab] for lab in labels]
    names = [cfg.glyphs.names[g] for g in ids]
    if max(emoji_units(names, background, cfg.glyphs.held_out)) != cfg.split:
        return None
    return emoji_layout(rng, cfg.resolution, grid, ids, labels, cfg.glyphs, background, SPLITS[cfg.split]), question


# ------------------------------------------------------------------------ digit strips


@functools.lru_cache(maxsize=16)
def _strings_with_sum(length: int) -> np.ndarray:
    """``[length + 1, 9 length + 1]`` int: entry ``[j, t]`` counts digit strings of length ``j`` summing to ``t``."""
    table = np.zeros((length + 1, 9 * length + 1), np.int64)
    table[0, 0] = 1
    for j in range(1, length + 1):
        for d in range(10):
            table[j, d:] += table[j - 1, : table.shape[1] - d]
    return table


def _digits_with_sum(rng: np.random.Generator, length: int, total: int) -> list[int]:
    """A digit string drawn uniformly among those of ``length`` digits summing to ``total``."""
    table, digits = _strings_with_sum(length), []
    for left in range(length - 1, -1, -1):
        weights = np.array([table[left, total - d] if 0 <= total - d <= 9 * left else 0 for d in range(10)], float)
        digits.append(int(rng.choice(10, p=weights / weights.sum())))
        total -= digits[-1]
    return digits


def _digit_item(rng: np.random.Generator, cfg: _Config, kind: str, answer: str) -> tuple[VQALayout, str] | None:
    if kind == "digit_sum":
        lengths = [k for k in cfg.digits if 9 * k >= int(answer)]
        digits = _digits_with_sum(rng, lengths[rng.integers(len(lengths))], int(answer))
        question = "what is the sum of the digits?"
    else:
        k = int(answer) if kind == "digit_count" else cfg.digits[rng.integers(len(cfg.digits))]
        digits = [int(d) for d in rng.integers(10, size=k)]
        question = "how many digits are there?"
        if kind == "digit_at":
            position = int(rng.integers(k))
            digits[position] = int(answer)
            question = f"which digit is at position {position + 1}?"
    if digit_string_split(digits) != cfg.split:
        return None
    pools = load_digit_images()[2][cfg.split]
    samples = [int(rng.choice(pools[d])) for d in digits]
    pairs = ink_pairs()
    background, ink = pairs[rng.integers(len(pairs))]
    return digit_layout(rng, cfg.resolution, digits, samples, background, ink, SPLITS[cfg.split]), question


# ------------------------------------------------------------------------ API


def _draw(rng: np.random.Generator, cfg: _Config, kind: str, answers: tuple[str, ...]) -> tuple[VQALayout, str, str]:
    make: Callable = _digit_item if kind in DIGIT_KINDS else _emoji_item
    for _ in range(MAX_ANSWER_TRIES):
        answer = answers[rng.integers(len(answers))]
        for _ in range(MAX_SCENE_TRIES):
            item = make(rng, cfg, kind, answer)
            if item is not None:
                return item[0], item[1], answer
    raise ValueError(f"no {SPLITS[cfg.split]} scene found for {kind!r} questions after {MAX_ANSWER_TRIES} answers; "
                     "use a larger vocabulary or max_emoji.")


def _check(split: str, n: int, resolution: int, seed: int, kinds: Sequence[str], max_emoji: int,
           digits: Sequence[int]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer number of questions, got {n!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if not _is_int(resolution) or resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
    if isinstance(kinds, str) or not kinds or any(k not in QUESTION_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty list from {QUESTION_KINDS}, got {kinds!r}.")
    if not _is_int(max_emoji) or not 2 <= max_emoji <= 4:
        raise ValueError(f"max_emoji must be 2, 3 or 4, got {max_emoji!r}.")
    if isinstance(digits, str) or not digits or any(not _is_int(k) or k not in DIGIT_COUNTS for k in digits) \
            or len(set(digits)) != len(digits):
        raise ValueError(f"digits must be distinct strip lengths from {DIGIT_COUNTS}, got {digits!r}.")
    if any(k in EMOJI_KINDS for k in kinds) and resolution // max_emoji < MIN_EMOJI_PX:
        raise ValueError(f"resolution {resolution} is too small for rows of {max_emoji} emoji ({resolution // max_emoji}"
                         f" px each, at least {MIN_EMOJI_PX} needed); use max_emoji <= "
                         f"{max(resolution // MIN_EMOJI_PX, 1)} or a larger resolution.")
    if any(k in DIGIT_KINDS for k in kinds) and resolution // max(digits) < DIGIT_PX:
        raise ValueError(f"resolution {resolution} is too small for strips of {max(digits)} digits "
                         f"({resolution // max(digits)} px each, at least {DIGIT_PX} needed); use digits of at most "
                         f"{resolution // DIGIT_PX} or a larger resolution.")


def vqa_items(split: str, n: int, resolution: int = 48, seed: int = 0, *, kinds: Sequence[str] = QUESTION_KINDS,
              vocabulary: str | Sequence[str | int] = "reference-32", max_emoji: int = 4,
              digits: Sequence[int] = DIGIT_COUNTS, glyphs: Glyphs | None = None
              ) -> tuple[list[VQALayout], list[str], list[str], list[str]]:
    """``(layouts, questions, answers, kinds)`` of ``n`` items, without drawing images (as :func:`vqa_scenes`)."""
    _check(split, n, resolution, seed, kinds, max_emoji, digits)
    glyphs = glyphs or load_glyphs()
    vocab = vocabulary_ids(vocabulary, glyphs)
    if any(k in EMOJI_KINDS for k in kinds) and len(vocab) < max_emoji + 1:
        raise ValueError(f"vocabulary has {len(vocab)} emoji; emoji questions need at least max_emoji + 1 = "
                         f"{max_emoji + 1}.")
    cfg = _Config(resolution, SPLITS.index(split), vocab, glyphs, max_emoji, tuple(sorted(digits)),
                  visible_on(glyphs, vocab))
    vocabularies = {k: answer_vocabulary(k, vocabulary=vocab, max_emoji=max_emoji, digits=digits, glyphs=glyphs)
                    for k in dict.fromkeys(kinds)}
    rng = np.random.default_rng([int(seed), cfg.split])
    item_kinds = [kinds[i % len(kinds)] for i in range(int(n))]
    items = [_draw(rng, cfg, kind, vocabularies[kind]) for kind in item_kinds]
    return [i[0] for i in items], [i[1] for i in items], [i[2] for i in items], item_kinds


def vqa_scenes(split: str, n: int, resolution: int = 48, seed: int = 0, *, kinds: Sequence[str] = QUESTION_KINDS,
               vocabulary: str | Sequence[str | int] = "reference-32", max_emoji: int = 4,
               digits: Sequence[int] = DIGIT_COUNTS, glyphs: Glyphs | None = None) -> VQAScenes:
    """``n`` question-answer items of ``split`` with their images (see the module docstring and :class:`VQAScenes`).

    ``kinds`` picks question kinds (round-robin), ``vocabulary`` the emoji (as :func:`scenes.vocabulary_ids`),
    ``max_emoji`` the largest emoji grid (2-4), ``digits`` the digit-strip lengths.
    """
    glyphs = glyphs or load_glyphs()
    layouts, questions, answers, item_kinds = vqa_items(split, n, resolution, seed, kinds=kinds, vocabulary=vocabulary,
                                                        max_emoji=max_emoji, digits=digits, glyphs=glyphs)
    images = np.stack([render_layout(layout, glyphs) for layout in layouts])
    return VQAScenes(images, questions, answers, item_kinds, layouts)


# ------------------------------------------------------------------------ baselines


class Baseline(NamedTuple):
    """A question kind's most common ``answer``, its ``share`` of the kind's items, and the number of
    ``distinct`` answers seen (chance is about ``1 / distinct``)."""

    answer: str
    share: float
    distinct: int


def majority_baselines(answers: Sequence[str], kinds: Sequence[str]) -> dict[str, Baseline]:
    """Per kind: the accuracy of always giving that kind's most common answer (a text-only model that reads
    only the question kind)."""
    result = {}
    for kind in dict.fromkeys(kinds):
        counts = Counter(a for a, k in zip(answers, kinds) if k == kind)
        answer, top = counts.most_common(1)[0]
        result[kind] = Baseline(answer, top / sum(counts.values()), len(counts))
    return result


def text_only_baseline(fit: tuple[Sequence[str], Sequence[str], Sequence[str]],
                       evaluate: tuple[Sequence[str], Sequence[str], Sequence[str]]) -> dict[str, float]:
    """Per kind: the accuracy on ``evaluate`` of answering each exact question text with its most common
    answer in ``fit`` (the kind's most common answer for an unseen question); both are ``(questions, answers,
    kinds)``. This is the best a model without the image can learn from ``fit``."""
    by_question: dict[str, Counter] = {}
    for q, a in zip(fit[0], fit[1]):
        by_question.setdefault(q, Counter())[a] += 1
    fallback = {k: b.answer for k, b in majority_baselines(fit[1], fit[2]).items()}
    hits: dict[str, list[bool]] = {}
    for q, a, k in zip(*evaluate):
        guess = by_question[q].most_common(1)[0][0] if q in by_question else fallback.get(k)
        hits.setdefault(k, []).append(guess == a)
    return {k: float(np.mean(v)) for k, v in hits.items()}


# ------------------------------------------------------------------------ sheet and CLI


def contact_sheet(path: str | Path, *, n: int = 18, columns: int = 6, resolution: int = 48, seed: int = 0,
                  split: str = "train", tile: int = 144) -> Path:
    """Write a PNG grid of ``n`` items (images enlarged to ``tile`` pixels, nearest neighbour) with their
    question and answer."""
    from PIL import Image, ImageDraw, ImageFont

    vqa = vqa_scenes(split, n, resolution, seed)
    font = ImageFont.load_default(size=11)
    texts = [textwrap.wrap(f"Q: {q}", width=tile // 6) + [f"A: {a}"] for q, a in zip(vqa.questions, vqa.answers)]
    line = font.getbbox("Ag")[3] + 2
    pad, text_h = 6, line * max(map(len, texts)) + 4
    rows = -(-n // columns)
    sheet = Image.new("RGB", (pad + columns * (tile + pad), pad + rows * (tile + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(vqa.images, texts)):
        x, y = pad + (i % columns) * (tile + pad), pad + (i // columns) * (tile + text_h + pad)
        sheet.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        for k, text in enumerate(lines):
            draw.text((x, y + tile + 2 + k * line), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jquant.data.vqa_scenes sheet --out PNG`` or ``... baselines [--n N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jquant.data.vqa_scenes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sheet_cmd = commands.add_parser("sheet", help="write a PNG of example images with question and answer")
    sheet_cmd.add_argument("--out", type=Path, required=True, help="PNG path")
    sheet_cmd.add_argument("--resolution", type=int, default=48)
    sheet_cmd.add_argument("--seed", type=int, default=0)
    base_cmd = commands.add_parser("baselines", help="print majority and text-only baselines per question kind")
    base_cmd.add_argument("--n", type=int, default=9000, help="items per split")
    base_cmd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "sheet":
            print(f"wrote {contact_sheet(args.out, resolution=args.resolution, seed=args.seed)}")
            return
        train, other = (vqa_items("train", args.n, seed=args.seed + k)[1:] for k in (0, 1))
        test = vqa_items("test", args.n, seed=args.seed)[1:]
        majority = majority_baselines(train[1], train[2])
        on_train, on_test = text_only_baseline(train, other), text_only_baseline(train, test)
        print("text-only models fit on train; train items of another seed, and test items")
        print("kind          answers  train majority (share)   text-only: train   test")
        for kind in QUESTION_KINDS:
            b = majority[kind]
            print(f"{kind:13s} {b.distinct:7d}  {b.answer!r:>14s} ({b.share:.3f})   {on_train[kind]:15.3f}"
                  f"  {on_test[kind]:.3f}")
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
