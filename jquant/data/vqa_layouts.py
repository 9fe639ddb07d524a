"""Scene layouts of the visual question answering set (:mod:`jquant.data.vqa_scenes`): emoji grids and
handwritten digit strips, their composition units and splits, and their rendering (pure numpy).

Emoji scenes put 1-4 distinct-cell emoji of the bundled atlas in a ``rows x cols`` grid of equal cells
(a row ``1 x k``, a column ``k x 1`` or a ``2 x 2`` grid) on a plain background of :data:`COLORS`. A cell's
emoji has side ``s`` drawn from ``[max(MIN_EMOJI_PX, ceil(0.75 c)), c]`` with ``c = min(R // rows, R // cols,
R // 2)``; it lies inside its cell (so cells never overlap and cell order is pixel order), centred within
``±R/8`` along an axis with one cell. Emoji are drawn as :func:`jquant.data.scenes.render` draws them, only
on backgrounds they stand out from (:func:`visible_on`: at least :data:`MIN_VISIBLE_FRACTION` of the glyph's
alpha-weighted pixels (every other atlas pixel) differ from the background colour by more than :data:`MIN_PIXEL_CONTRAST` in RGB; this
rules out e.g. a sun on yellow, 14 of the 320 pairs of ``"reference-32"`` and colours).

Digit strips put ``k`` (3-5) of scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
bundled with scikit-learn, UCI optdigits test set) left to right in ``k`` equal columns, each digit upscaled
to side ``s`` in ``[max(DIGIT_PX, ceil(0.7 c)), c]`` (``c = min(R // k, R // 2)``) with the tent filter of
:func:`jquant.data.scenes.tent_weights` (bilinear when enlarging), as ink of one colour over a plain
background of another (a pair whose Rec. 601 luma differs by at least :data:`MIN_INK_CONTRAST`):
``out = a ink + (1 - a) background`` with ``a`` the resized grey level ``/ 16``.

Splits (index 0 train, 1 validation, 2 test) reuse :func:`jquant.data.scenes.unit_split` (sha256 of a key,
10 % validation, 10 % test):

* emoji: the units are those of :mod:`jquant.data.scenes` with the same keys (every unordered pair of
  distinct emoji, ``"pair/a/b"``; one distinct emoji: ``"single/name/colour"``), held-out emoji are test;
  a scene's split is that of its most held-out unit, so image-set and VQA splits agree;
* digits: the unit is the digit string (``"digits/3071"``), and each digit image comes from the handwriting
  pool of the scene's split (sample ``i`` of ``load_digits`` belongs to ``unit_split("digit-sample/i")``), so
  held-out scenes show unseen strings written by unseen hands.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jquant.data.emoji import Glyphs
from jquant.data.scenes import (
    COLORS,
    Layout,
    SceneObject,
    render,
    tent_weights,
    unit_split,
)

MIN_EMOJI_PX = 12  # the video set found 10-13 px emoji hard to read; 13-16 px easy
DIGIT_PX = 8  # scikit-learn's digits are 8x8; never shrunk
MIN_INK_CONTRAST = 100.0  # Rec. 601 luma difference of a digit strip's ink and background
DIGIT_LEVELS = 16  # load_digits grey levels run 0..16
MIN_PIXEL_CONTRAST = 80.0  # RGB Euclidean distance of a glyph pixel that stands out from the background
MIN_VISIBLE_FRACTION = 0.3


@dataclass(frozen=True)
class Cell:
    """One drawn item in grid cell ``(row, col)``: box ``[top : top + size, left : left + size]``, ``name``
    (emoji name or digit ``"0"``-``"9"``), ``label`` (vocabulary position or digit value) and ``source``
    (atlas index or ``load_digits`` sample index)."""

    row: int
    col: int
    top: int
    left: int
    size: int
    name: str
    label: int
    source: int


@dataclass(frozen=True)
class VQALayout:
    """Everything that defines a scene: ``kind`` (``"emoji"`` or ``"digits"``), the ``grid`` ``(rows, cols)``,
    ``cells`` in row-major order, ``background`` colour name, ``ink`` colour (digits only) and ``split``."""

    kind: str
    resolution: int
    grid: tuple[int, int]
    cells: tuple[Cell, ...]
    background: str
    ink: str | None
    split: str

    def at(self, row: int, col: int) -> Cell | None:
        """The cell at ``(row, col)``, or None outside the grid."""
        return next((c for c in self.cells if (c.row, c.col) == (row, col)), None)


# ------------------------------------------------------------------------ units


def emoji_units(names: list[str], background: str, held_out: frozenset[str]) -> list[int]:
    """Split indices of an emoji scene's composition units (see the module docstring)."""
    distinct = sorted(set(names))
    if len(distinct) == 1:
        return [2 if distinct[0] in held_out else unit_split(f"single/{distinct[0]}/{background}")]
    return [2 if a in held_out or b in held_out else unit_split(f"pair/{a}/{b}")
            for i, a in enumerate(distinct) for b in distinct[i + 1:]]


def digit_string_split(digits: list[int]) -> int:
    """Split index of a digit string's composition unit."""
    return unit_split("digits/" + "".join(map(str, digits)))


def visible_on(glyphs: Glyphs, ids: Sequence[int]) -> np.ndarray:
    """``[len(ids), len(COLORS)]`` bool: glyph ``ids[i]`` stands out from colour ``j`` of :data:`COLORS` (see the
    module docstring)."""
    images = glyphs.images[list(ids), ::2, ::2]  # every other atlas pixel: 4x less work, same fractions to ~1 %
    alpha, rgb = images[..., 3].astype(np.float32), images[..., :3].astype(np.float32)
    fractions = [np.einsum("nhw,nhw->n", alpha, (np.square(rgb - c).sum(-1) > MIN_PIXEL_CONTRAST**2).astype(np.float32))
                 / alpha.sum((1, 2)) for c in np.array(list(COLORS.values()), np.float32)]
    return np.stack(fractions, axis=1) >= MIN_VISIBLE_FRACTION


# ------------------------------------------------------------------------ digits


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray, tuple[tuple[np.ndarray, ...], ...]]:
    """scikit-learn's digits: ``(images [1797, 8, 8] float64 in 0..16, targets [1797] int, pools)`` with
    ``pools[split][d]`` the sample indices of digit ``d`` in that split's handwriting pool."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("digit strips need scikit-learn (its bundled load_digits, no download): "
                          "pip install scikit-learn") from None
    data = load_digits()
    images, targets = np.asarray(data.images, np.float64), np.asarray(data.target, np.int64)
    sample_split = np.array([unit_split(f"digit-sample/{i}") for i in range(len(targets))])
    pools = tuple(tuple(np.flatnonzero((sample_split == s) & (targets == d)) for d in range(10)) for s in range(3))
    return images, targets, pools


def ink_pairs() -> list[tuple[str, str]]:
    """``(background, ink)`` colour-name pairs whose Rec. 601 luma differs by at least :data:`MIN_INK_CONTRAST`."""
    luma = {k: 0.299 * r + 0.587 * g + 0.114 * b for k, (r, g, b) in COLORS.items()}
    return [(a, b) for a in COLORS for b in COLORS if abs(luma[a] - luma[b]) >= MIN_INK_CONTRAST]


# ------------------------------------------------------------------------ placement


def _bounds(resolution: int, count: int) -> list[int]:
    return [round(k * resolution / count) for k in range(count + 1)]


def _offset(rng: np.random.Generator, bounds: list[int], index: int, size: int, resolution: int) -> int:
    """Where a box of ``size`` starts along an axis: inside its cell, or near the centre (±R/8) if the axis has
    one cell."""
    if len(bounds) == 2:
        centre, jitter = (resolution - size) // 2, resolution // 8
        return int(rng.integers(max(0, centre - jitter), min(resolution - size, centre + jitter) + 1))
    return int(rng.integers(bounds[index], bounds[index + 1] - size + 1))


def place(rng: np.random.Generator, resolution: int, grid: tuple[int, int], smallest: int,
          fill: float) -> list[tuple[int, int, int, int, int]]:
    """Boxes ``(row, col, top, left, size)`` in row-major order; sides drawn from ``[max(smallest,
    ceil(fill c)), c]``, ``c = min(R // rows, R // cols, R // 2)``."""
    rows, cols = grid
    c = min(resolution // rows, resolution // cols, resolution // 2)
    lo = max(smallest, math.ceil(fill * c))
    row_bounds, col_bounds = _bounds(resolution, rows), _bounds(resolution, cols)
    boxes = []
    for r in range(rows):
        for k in range(cols):
            size = int(rng.integers(lo, c + 1))
            boxes.append((r, k, _offset(rng, row_bounds, r, size, resolution),
                          _offset(rng, col_bounds, k, size, resolution), size))
    return boxes


def emoji_layout(rng: np.random.Generator, resolution: int, grid: tuple[int, int], glyph_ids: list[int],
                 labels: list[int], glyphs: Glyphs, background: str, split: str) -> VQALayout:
    """Place ``glyph_ids`` (atlas indices, row-major) in ``grid``."""
    cells = tuple(Cell(r, k, top, left, size, glyphs.names[g], lab, g)
                  for (r, k, top, left, size), g, lab in zip(place(rng, resolution, grid, MIN_EMOJI_PX, 0.75),
                                                            glyph_ids, labels))
    return VQALayout("emoji", resolution, grid, cells, background, None, split)


def digit_layout(rng: np.random.Generator, resolution: int, digits: list[int], samples: list[int],
                 background: str, ink: str, split: str) -> VQALayout:
    """Place ``digits`` (drawn from ``load_digits`` samples ``samples``) left to right in one row."""
    boxes = place(rng, resolution, (1, len(digits)), DIGIT_PX, 0.7)
    cells = tuple(Cell(r, k, top, left, size, str(d), d, s)
                  for (r, k, top, left, size), d, s in zip(boxes, digits, samples))
    return VQALayout("digits", resolution, (1, len(digits)), cells, background, ink, split)


# ------------------------------------------------------------------------ render


def render_layout(layout: VQALayout, glyphs: Glyphs) -> np.ndarray:
    """The scene image ``[R, R, 3]`` uint8 of ``layout``."""
    if layout.kind == "emoji":
        objects = tuple(SceneObject(c.source, c.label, c.name, c.name, c.top, c.left, c.size) for c in layout.cells)
        return render(Layout(layout.resolution, objects, None, (layout.background,), layout.split), glyphs)
    images = load_digit_images()[0]
    image = np.broadcast_to(np.array(COLORS[layout.background], np.float64),
                            (layout.resolution, layout.resolution, 3)).copy()
    ink = np.array(COLORS[layout.ink], np.float64)
    for c in layout.cells:
        w = tent_weights(images.shape[1], c.size)
        alpha = np.clip(w @ images[c.source] @ w.T / DIGIT_LEVELS, 0.0, 1.0)[..., None]
        region = image[c.top : c.top + c.size, c.left : c.left + c.size]
        region[...] = alpha * ink + (1.0 - alpha) * region
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
