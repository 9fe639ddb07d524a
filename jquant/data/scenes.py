"""Captioned emoji scenes: 1-3 glyphs of the bundled atlas on a plain or gradient background (pure numpy).

A scene is square, ``resolution`` 32 or 64 pixels, and deterministic from a seed. Captions are short and
regular, built from the glyphs' phrases (:mod:`jquant.data.emoji`) and the background's colour names::

    1 glyph:   "a red apple on a blue background"
    2 glyphs:  "a dog face to the left of a red apple on a white background"   (to the left of / to the
               right of / above / below; the first-named glyph is the subject)
    3 glyphs:  "a frog, a rocket and grapes in a row on a red to blue gradient"   (row: left to right;
               column: top to bottom; a gradient runs from its first colour at the top to its second)

Layout (``R`` = resolution): one glyph has side ``U[0.55, 0.8] R``, near the centre (``±R/10``); two
glyphs ``U[0.36, 0.48] R`` each, one per half along the relation's axis (so the relation holds with no
overlap); three ``U[0.26, 0.32] R`` each, one per third. Glyphs are resized from the 64x64 atlas with
a triangle (tent) filter whose support grows with the downscale factor, in premultiplied alpha, and
composited with the "over" operator (Porter & Duff 1984): ``out = c_f + (1 - a_f) * c_b``.

Splits (train / validation / test) hold out emoji and compositions:

* the atlas's held-out emoji (``load_glyphs().held_out``, about 10 %) appear only in test;
* a composition unit is an unordered glyph pair (scenes of 2-3 glyphs) or a (glyph, background) pair
  (1 glyph). Each unit's split is fixed by the sha256 of its names (10 % validation, 10 % test), so it
  does not depend on the vocabulary; a scene's split is that of its most held-out unit. Train scenes
  hold only train units; every validation (test) scene holds a validation (test) unit that no train
  scene holds.

``vocabulary`` picks the glyphs: ``"all"``, a subset of the manifest (recommended for a tiny 32x32
model: ``"reference-32"``, 32 visually distinct emoji, objects ``(1, 2)``), or a list of names or atlas
indices. Labels are positions in the vocabulary, so single-glyph scenes (``objects=(1,)``) are a
classification set with ``labels[:, 0]`` as class ids.
"""

from __future__ import annotations

import functools
import hashlib
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jquant.data.emoji import Glyphs, load_glyphs

RESOLUTIONS = (32, 64)
SPLITS = ("train", "validation", "test")
BACKGROUND_KINDS = ("plain", "gradient")
OBJECT_COUNTS = (1, 2, 3)
COLORS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (24, 24, 24), "gray": (128, 128, 128), "red": (210, 40, 40),
    "orange": (245, 140, 30), "yellow": (245, 215, 50), "green": (60, 170, 70), "blue": (45, 90, 210),
    "purple": (135, 65, 180), "pink": (245, 160, 200),
}
PAIR_RELATIONS = ("to the left of", "to the right of", "above", "below")
TRIPLE_RELATIONS = ("in a row", "in a column")
HELD_OUT_FRACTION = 0.1  # of composition units, for each of validation and test
SIZE_FRACTIONS = {1: (0.55, 0.8), 2: (0.36, 0.48), 3: (0.26, 0.32)}
_MAX_TRIPLE_TRIES = 1000


@dataclass(frozen=True)
class SceneObject:
    """One placed glyph: atlas index ``glyph``, vocabulary position ``label``, caption ``phrase`` and
    box ``[top : top + size, left : left + size]``."""

    glyph: int
    label: int
    name: str
    phrase: str
    top: int
    left: int
    size: int


@dataclass(frozen=True)
class Layout:
    """Everything that defines a scene: ``objects`` in caption order, ``relation`` (None for one glyph),
    ``background`` (one colour name, or two for a top-to-bottom gradient) and the ``split`` it belongs to."""

    resolution: int
    objects: tuple[SceneObject, ...]
    relation: str | None
    background: tuple[str, ...]
    split: str

    @property
    def caption(self) -> str:
        phrases = [o.phrase for o in self.objects]
        article = "an" if self.background[0][0] in "aeiou" else "a"
        where = (f"{article} {self.background[0]} background" if len(self.background) == 1
                 else f"{article} {self.background[0]} to {self.background[1]} gradient")
        if len(phrases) == 1:
            what = phrases[0]
        elif len(phrases) == 2:
            what = f"{phrases[0]} {self.relation} {phrases[1]}"
        else:
            what = f"{', '.join(phrases[:-1])} and {phrases[-1]} {self.relation}"
        return f"{what} on {where}"


class EmojiScenes(NamedTuple):
    """``images [n, R, R, 3]`` uint8, ``captions``, ``labels [n, 3]`` int32 vocabulary positions in caption
    order (-1 where a scene has fewer glyphs) and the ``layouts``."""

    images: np.ndarray
    captions: list[str]
    labels: np.ndarray
    layouts: list[Layout]


# ------------------------------------------------------------------------ splits


def unit_split(key: str) -> int:
    """Split index (0 train, 1 validation, 2 test) of a composition unit, from the sha256 of ``key``."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return 1 if u < HELD_OUT_FRACTION else 2 if u < 2 * HELD_OUT_FRACTION else 0


def background_options(kind: str) -> list[tuple[str, ...]]:
    """All backgrounds of one kind: ``(colour,)`` for plain, ``(top, bottom)`` distinct colours for gradient."""
    if kind == "plain":
        return [(c,) for c in COLORS]
    return [(a, b) for a in COLORS for b in COLORS if a != b]


@dataclass(frozen=True)
class _Plan:
    """Composition units of one vocabulary by split: ``singles[(split, kind)] [m, 2]`` (label, background
    index), ``pairs[split] [m, 2]`` (label a < label b) and ``pair_split [V, V]``."""

    singles: dict[tuple[int, str], np.ndarray]
    pairs: dict[int, np.ndarray]
    pair_split: np.ndarray


@functools.lru_cache(maxsize=8)
def _plan(names: tuple[str, ...], held_out: frozenset[str]) -> _Plan:
    held = [n in held_out for n in names]
    singles = {}
    for kind in BACKGROUND_KINDS:
        units = [(i, b, 2 if held[i] else unit_split(f"single/{n}/{'/'.join(bg)}"))
                 for i, n in enumerate(names) for b, bg in enumerate(background_options(kind))]
        for s in range(len(SPLITS)):
            singles[(s, kind)] = np.array([(i, b) for i, b, u in units if u == s], np.int64).reshape(-1, 2)
    pair_split = np.zeros((len(names), len(names)), np.int8)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            first, second = sorted((names[i], names[j]))
            pair_split[i, j] = pair_split[j, i] = 2 if held[i] or held[j] else unit_split(f"pair/{first}/{second}")
    upper = np.triu(np.ones_like(pair_split, bool), 1)
    pairs = {s: np.argwhere(upper & (pair_split == s)) for s in range(len(SPLITS))}
    return _Plan(singles, pairs, pair_split)


def _vocabulary_plan(vocab: tuple[int, ...], glyphs: Glyphs) -> _Plan:
    return _plan(tuple(glyphs.names[g] for g in vocab), glyphs.held_out)


def vocabulary_ids(vocabulary: str | Sequence[str | int], glyphs: Glyphs) -> tuple[int, ...]:
    """Atlas indices of ``vocabulary``: ``"all"``, a subset name of the manifest, or glyph names / atlas indices."""
    if isinstance(vocabulary, str):
        if vocabulary == "all":
            return tuple(range(len(glyphs.names)))
        if vocabulary not in glyphs.subsets:
            raise ValueError(f"vocabulary {vocabulary!r} is not 'all' or a subset ({', '.join(glyphs.subsets)}); "
                             "pass one of those or a list of emoji names.")
        vocabulary = glyphs.subsets[vocabulary]
    ids = []
    for item in vocabulary:
        if _is_int(item):
            if not 0 <= item < len(glyphs.names):
                raise ValueError(f"vocabulary: atlas index {item} is outside [0, {len(glyphs.names)}).")
            ids.append(int(item))
        elif isinstance(item, str):
            ids.append(glyphs.index(item))
        else:
            raise ValueError(f"vocabulary entries must be emoji names or atlas indices, got {item!r}.")
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"vocabulary must list distinct emoji, at least one; got {list(vocabulary)!r}.")
    return tuple(ids)


# ------------------------------------------------------------------------ layout


def _sizes(rng: np.random.Generator, count: int, resolution: int, slot: int) -> list[int]:
    lo, hi = (round(f * resolution) for f in SIZE_FRACTIONS[count])
    return [int(s) for s in rng.integers(lo, min(hi, slot) + 1, size=count)]


def _near_centre(rng: np.random.Generator, size: int, extent: int, jitter: int) -> int:
    centre = (extent - size) // 2
    return int(rng.integers(max(0, centre - jitter), min(extent - size, centre + jitter) + 1))


def _place(rng: np.random.Generator, resolution: int, count: int, relation: str | None) -> list[tuple[int, int, int]]:
    """Boxes ``(top, left, size)`` in caption order (see the module docstring for the rules)."""
    r = resolution
    if count == 1:
        (size,) = _sizes(rng, 1, r, r)
        return [(_near_centre(rng, size, r, r // 10), _near_centre(rng, size, r, r // 10), size)]
    bounds = [round(k * r / count) for k in range(count + 1)]
    slots = list(range(count))
    if relation in ("to the right of", "below"):
        slots.reverse()  # the subject (named first) takes the second slot
    sizes = _sizes(rng, count, r, min(np.diff(bounds)))
    boxes = []
    for size, slot in zip(sizes, slots):
        along = int(rng.integers(bounds[slot], bounds[slot + 1] - size + 1))
        across = _near_centre(rng, size, r, r // 8)
        horizontal = relation in ("to the left of", "to the right of", "in a row")
        boxes.append((across, along, size) if horizontal else (along, across, size))
    return boxes


def _pick(rng: np.random.Generator, options: np.ndarray, what: str, split: int) -> np.ndarray:
    if len(options) == 0:
        raise ValueError(f"This vocabulary has no {SPLITS[split]} {what}; use a larger vocabulary or other objects.")
    return options[rng.integers(len(options))]


def _draw_layout(rng: np.random.Generator, resolution: int, split: int, vocab: tuple[int, ...], plan: _Plan,
                 glyphs: Glyphs, objects: Sequence[int], kinds: Sequence[str]) -> Layout:
    count = int(objects[rng.integers(len(objects))])
    kind = kinds[rng.integers(len(kinds))]
    if count == 1:
        label, b = _pick(rng, plan.singles[(split, kind)], f"(emoji, {kind} background) pairs", split)
        labels, relation, background = [int(label)], None, background_options(kind)[b]
    else:
        background = background_options(kind)[rng.integers(len(background_options(kind)))]
        for _ in range(_MAX_TRIPLE_TRIES):
            labels = [int(x) for x in _pick(rng, plan.pairs[split], "emoji pairs", split)]
            if count == 2:
                break
            fits = np.maximum(plan.pair_split[labels[0]], plan.pair_split[labels[1]]) <= split
            fits[labels] = False
            if fits.any():
                labels.append(int(rng.choice(np.flatnonzero(fits))))
                break
        else:
            raise ValueError(f"This vocabulary has no {SPLITS[split]} emoji triples; use a larger vocabulary.")
        labels = [labels[i] for i in rng.permutation(count)]
        relation = str(rng.choice(PAIR_RELATIONS if count == 2 else TRIPLE_RELATIONS))
    boxes = _place(rng, resolution, count, relation)
    placed = tuple(SceneObject(vocab[lab], lab, glyphs.names[vocab[lab]], glyphs.phrases[vocab[lab]], *box)
                   for lab, box in zip(labels, boxes))
    return Layout(resolution, placed, relation, tuple(background), SPLITS[split])


# ------------------------------------------------------------------------ render


@functools.lru_cache(maxsize=256)
def tent_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` rows of an antialiased tent filter: output pixel ``i`` centred at input
    ``(i + 0.5) s - 0.5`` (``s = n_in / n_out``), weights ``max(0, 1 - |x - c| / max(s, 1))``, rows summing to 1."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / max(scale, 1.0))
    return w / w.sum(axis=1, keepdims=True)


def resize_premultiplied(glyph: np.ndarray, size: int) -> np.ndarray:
    """``glyph [S, S, 4]`` uint8 straight RGBA -> ``[size, size, 4]`` float64 premultiplied (RGB 0..255, alpha 0..1)."""
    alpha = glyph[..., 3:].astype(np.float64) / 255.0
    premultiplied = np.concatenate([glyph[..., :3] * alpha, alpha], axis=-1)
    w = tent_weights(glyph.shape[0], size)
    return np.tensordot(np.tensordot(w, premultiplied, (1, 0)), w, (1, 1)).transpose(0, 2, 1)


def background_image(background: tuple[str, ...], resolution: int) -> np.ndarray:
    """``[R, R, 3]`` float64: a plain colour, or a linear top-to-bottom blend at row centres ``(y + 0.5) / R``."""
    top = np.array(COLORS[background[0]], np.float64)
    bottom = np.array(COLORS[background[-1]], np.float64)
    t = ((np.arange(resolution) + 0.5) / resolution)[:, None, None]
    return np.broadcast_to((1 - t) * top + t * bottom, (resolution, resolution, 3)).copy()


def render(layout: Layout, glyphs: Glyphs | None = None) -> np.ndarray:
    """The scene image ``[R, R, 3]`` uint8 of ``layout``."""
    glyphs = glyphs or load_glyphs()
    image = background_image(layout.background, layout.resolution)
    for o in layout.objects:
        fg = resize_premultiplied(glyphs.images[o.glyph], o.size)
        region = image[o.top : o.top + o.size, o.left : o.left + o.size]
        region[...] = fg[..., :3] + (1.0 - fg[..., 3:]) * region
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- API


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check(resolution: int, split: str, objects: Sequence[int], kinds: Sequence[str]) -> int:
    if not _is_int(resolution) or resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not objects or any(not _is_int(k) or k not in OBJECT_COUNTS for k in objects):
        raise ValueError(f"objects must be a non-empty list of glyph counts from {OBJECT_COUNTS}, got {objects!r}.")
    if isinstance(kinds, str) or not kinds or any(k not in BACKGROUND_KINDS for k in kinds):
        raise ValueError(f"backgrounds must be a non-empty list from {BACKGROUND_KINDS}, got {kinds!r}.")
    return SPLITS.index(split)


def make_scene(rng: np.random.Generator | int, resolution: int = 32, split: str = "train", *,
               vocabulary: str | Sequence[str | int] = "all", objects: Sequence[int] = OBJECT_COUNTS,
               backgrounds: Sequence[str] = BACKGROUND_KINDS,
               glyphs: Glyphs | None = None) -> tuple[np.ndarray, str, Layout]:
    """One scene of ``split``: ``(image [R, R, 3] uint8, caption, layout)``; ``rng`` is a Generator or a seed.

    The glyph count is drawn uniformly from ``objects`` and the background kind from ``backgrounds``.
    """
    split_index = _check(resolution, split, objects, backgrounds)
    glyphs = glyphs or load_glyphs()
    if not isinstance(rng, np.random.Generator):
        if not _is_int(rng):
            raise ValueError(f"rng must be a numpy Generator or an integer seed, got {rng!r}.")
        rng = np.random.default_rng(int(rng))
    vocab = vocabulary_ids(vocabulary, glyphs)
    layout = _draw_layout(rng, resolution, split_index, vocab, _vocabulary_plan(vocab, glyphs), glyphs,
                          list(objects), list(backgrounds))
    return render(layout, glyphs), layout.caption, layout


def emoji_scenes(split: str, n: int, resolution: int = 32, seed: int = 0, *,
                 vocabulary: str | Sequence[str | int] = "all", objects: Sequence[int] = OBJECT_COUNTS,
                 backgrounds: Sequence[str] = BACKGROUND_KINDS, glyphs: Glyphs | None = None) -> EmojiScenes:
    """``n`` scenes of ``split`` from ``np.random.default_rng([seed, split index])`` (the first ``m`` of ``n``
    scenes equal the ``m`` scenes of the same call with ``n=m``). See :class:`EmojiScenes`."""
    split_index = _check(resolution, split, objects, backgrounds)
    if not _is_int(n) or n <= 0:
        raise ValueError(f"n must be a positive integer number of scenes, got {n!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    glyphs = glyphs or load_glyphs()
    vocab = vocabulary_ids(vocabulary, glyphs)
    rng, plan = np.random.default_rng([int(seed), split_index]), _vocabulary_plan(vocab, glyphs)
    layouts = [_draw_layout(rng, resolution, split_index, vocab, plan, glyphs, list(objects), list(backgrounds))
               for _ in range(int(n))]
    labels = np.full((len(layouts), max(OBJECT_COUNTS)), -1, np.int32)
    for row, layout in zip(labels, layouts):
        row[: len(layout.objects)] = [o.label for o in layout.objects]
    return EmojiScenes(np.stack([render(lay, glyphs) for lay in layouts]), [lay.caption for lay in layouts],
                       labels, layouts)


def contact_sheet(path: str | Path, *, n: int = 15, columns: int = 5, resolution: int = 64, seed: int = 0,
                  vocabulary: str | Sequence[str | int] = "all", split: str = "train") -> Path:
    """Write a PNG grid of ``n`` scenes (enlarged to 128 pixels, nearest neighbour) with their captions."""
    from PIL import Image, ImageDraw, ImageFont

    scenes = emoji_scenes(split, n, resolution, seed, vocabulary=vocabulary)
    font = ImageFont.load_default(size=11)
    captions = [textwrap.wrap(caption, width=22) for caption in scenes.captions]
    line_height = font.getbbox("Ag")[3] + 2
    tile, pad, text_height = 128, 6, line_height * max(map(len, captions)) + 4
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + text_height + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(scenes.images, captions)):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + text_height + pad)
        sheet.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + tile + 2 + k * line_height), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jquant.data.scenes sheet --out PNG``: a contact sheet of captioned scenes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jquant.data.scenes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sheet_cmd = commands.add_parser("sheet", help="write a contact sheet PNG of captioned scenes")
    sheet_cmd.add_argument("--out", type=Path, required=True, help="PNG path")
    sheet_cmd.add_argument("--resolution", type=int, default=64)
    sheet_cmd.add_argument("--seed", type=int, default=0)
    sheet_cmd.add_argument("--vocabulary", default="all", help='"all", a subset name, or comma-separated names')
    args = parser.parse_args(argv)
    vocabulary = [n.strip() for n in args.vocabulary.split(",")] if "," in args.vocabulary else args.vocabulary
    try:
        contact_sheet(args.out, resolution=args.resolution, seed=args.seed, vocabulary=vocabulary)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
