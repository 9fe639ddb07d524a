"""Captioned emoji clips with scripted motion and per-frame ground truth (pure numpy).

A clip is ``[F, R, R, 3]`` uint8 (``F = 1 + 4k`` frames, default 17; ``R`` 32 or 64) of 1-2 emoji of the
bundled atlas over a plain or gradient background (:mod:`jquant.data.scenes` draws every frame). Its
``F - 1`` frame transitions are cut into segments of 4 or 8 transitions (whole latent frames of a 4x
temporal VAE: segment boundaries fall on frames ``4j``), each with one scripted behaviour:

=============  =================================================================================
``still``      nothing changes: the segment's frames are identical
``drift``      one object moves ``R/32`` pixels per frame along each moving axis (4 or 8 frames)
``fast``       one object moves ``3R/32`` pixels per frame along each moving axis (4 frames)
``appear``     a hidden object of the scene appears on the segment's first transition, then stills
``disappear``  a visible object vanishes on the segment's first transition, then stills
``cut``        on the first transition the background changes (``cut="background"``) or a new scene
               (new emoji, positions and background) replaces the old one (``cut="scene"``)
=============  =================================================================================

Directions: up, down, left, right and the four diagonals (a diagonal moves both axes by the speed, so
its displacement is ``sqrt(2)`` times longer). Positions are whole pixels, so still frames are
bit-identical and a moving object shifts by exact pixel counts. Objects stay inside the frame: a
segment's direction is drawn among those that keep some start position valid for all of the scene's
frames, the start positions are drawn last (the least-overlapping of 8 draws), and a ``fast`` segment
with no valid direction becomes a ``drift`` (which always has one: its displacement is at most half the
free space). Two objects may overlap; slot 1 is drawn over slot 0.

The kind of each segment is drawn with weights :data:`KIND_WEIGHTS` among those of ``motions`` that
the state allows (motion needs a visible object, ``appear`` a hidden one, ``disappear`` a visible one);
``still`` is used when none is allowed. A two-emoji scene starts with its second object hidden with
probability 1/3 when ``appear`` is allowed.

Captions name the scene, then one clause per segment::

    "a rocket on a blue background darts up, then stops"
    "a dog face on a white background drifts left; the scene cuts to a red apple on a green background"
    "a frog and grapes on a red to blue gradient stay still, then the frog drifts down and to the right,
     then grapes appear"   (a hidden object is named when it appears)

Ground truth (:class:`ClipTruth`) gives per frame and object slot the box (top, left, size), visibility,
glyph and label; per frame the background, the motion magnitude (largest Euclidean displacement, in
pixels, of an object visible in both frames ``t - 1`` and ``t``; 0 for frame 0), scene-cut flags, and
``changed`` (frame ``t`` differs from frame ``t - 1``: motion, an appearance or disappearance, or a cut);
and the segment list: what a dynamic-frame-rate method is checked against.

Splits reuse :mod:`jquant.data.scenes`: every scene of a clip (the stretch between cuts) is one
composition unit of the clip's split, a (glyph, background) pair for one emoji or a glyph pair for two,
so held-out emoji and compositions stay out of train exactly as for images.

``python -m jquant.data.video_scenes sheet --out FILE.png|FILE.gif`` draws a contact sheet (one row of
frames per clip, motion and cuts marked) or an animated GIF grid.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jquant.data.emoji import Glyphs, load_glyphs
from jquant.data.scenes import (
    BACKGROUND_KINDS,
    COLORS,
    RESOLUTIONS,
    SPLITS,
    _pick,
    _vocabulary_plan,
    background_image,
    background_options,
    resize_premultiplied,
    vocabulary_ids,
)

FRAME_BLOCK = 4  # transitions per latent frame of a 4x temporal VAE
MAX_FRAMES = 65
OBJECT_COUNTS = (1, 2)
MAX_OBJECTS = max(OBJECT_COUNTS)
SEGMENT_KINDS = ("still", "drift", "fast", "appear", "disappear", "cut")
KIND_WEIGHTS = {"still": 3.0, "drift": 3.0, "fast": 2.0, "appear": 1.0, "disappear": 1.0, "cut": 1.5}
DIRECTIONS: dict[str, tuple[int, int]] = {
    "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
    "up-left": (-1, -1), "up-right": (-1, 1), "down-left": (1, -1), "down-right": (1, 1),
}
DIRECTION_WORDS = {d: d if "-" not in d else "{} and to the {}".format(*d.split("-")) for d in DIRECTIONS}
SPEEDS = {"drift": 1, "fast": 3}  # pixels per frame per moving axis at R = 32 (scaled by R / 32)
SIZE_FRACTIONS = {1: (0.3, 0.4), 2: (0.25, 0.32)}
HIDDEN_START_PROBABILITY = 1 / 3
_PLACEMENT_DRAWS = 8
_MAX_SCENE_TRIES = 100


@dataclass(frozen=True)
class Segment:
    """Frames ``start .. end`` (transitions ``start -> start + 1`` up to ``end - 1 -> end``) of one ``kind``;
    ``subject`` is the slot that moves / appears / disappears (-1 if none), ``direction`` a key of
    :data:`DIRECTIONS` for motion, ``cut`` ``"background"`` or ``"scene"`` for cuts."""

    kind: str
    start: int
    end: int
    subject: int = -1
    direction: str | None = None
    cut: str | None = None


class ClipTruth(NamedTuple):
    """Per-frame ground truth of one clip (``F`` frames, ``K = 2`` object slots).

    ``positions [F, K, 2]`` int32 (top, left) and ``sizes [F, K]`` int32 of each slot's square box
    (0 for an unused slot), ``visible [F, K]`` bool, ``glyphs [F, K]`` int32 atlas indices and ``labels
    [F, K]`` int32 vocabulary positions (-1 for an unused slot), ``backgrounds`` (F colour-name tuples),
    ``motion [F]`` float64 pixels, ``cuts [F]`` bool, ``changed [F]`` bool, the ``segments``, ``split`` and
    ``resolution``.
    """

    positions: np.ndarray
    sizes: np.ndarray
    visible: np.ndarray
    glyphs: np.ndarray
    labels: np.ndarray
    backgrounds: tuple[tuple[str, ...], ...]
    motion: np.ndarray
    cuts: np.ndarray
    changed: np.ndarray
    segments: tuple[Segment, ...]
    split: str
    resolution: int


class VideoScenes(NamedTuple):
    """``videos [n, F, R, R, 3]`` uint8, ``captions``, ``motion [n, F]`` float64 and ``cuts [n, F]`` bool
    (stacked from the truths), and each clip's :class:`ClipTruth`."""

    videos: np.ndarray
    captions: list[str]
    motion: np.ndarray
    cuts: np.ndarray
    truths: list[ClipTruth]


# ------------------------------------------------------------------------ planning


@dataclass
class _Slot:
    """One object of the current scene: offsets from its (not yet drawn) start position are tracked with
    their per-axis extremes, which bound the valid start positions ``[-lowest, free - highest]``."""

    label: int
    size: int
    visible: bool
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    lowest: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    highest: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    mentioned: bool = False


@dataclass
class _Scene:
    background: tuple[str, ...]
    slots: list[_Slot]
    first_frame: int


def _phrase(glyphs: Glyphs, vocab: tuple[int, ...], slot: _Slot) -> str:
    g = vocab[slot.label]
    return f"the {glyphs.names[g]}" if slot.mentioned else glyphs.phrases[g]


def _plural(glyphs: Glyphs, vocab: tuple[int, ...], slot: _Slot) -> bool:
    name, phrase = glyphs.names[vocab[slot.label]], glyphs.phrases[vocab[slot.label]]
    last = name.split()[-1]
    return phrase == name and last.endswith("s") and not last.endswith(("ss", "us", "is", "os"))


def _verb(word: str, plural: bool) -> str:
    """``word`` in the third person singular ("drifts", "stays still") or plural ("drift", "stay still")."""
    head, _, rest = word.partition(" ")
    return (head if plural else head + "s") + (f" {rest}" if rest else "")


def _where(background: tuple[str, ...]) -> str:
    article = "an" if background[0][0] in "aeiou" else "a"
    return (f"{article} {background[0]} background" if len(background) == 1
            else f"{article} {background[0]} to {background[1]} gradient")


class _Planner:
    """Draws one clip's script frame by frame (see the module docstring) and its caption."""

    def __init__(self, rng: np.random.Generator, resolution: int, frames: int, split: int,
                 vocab: tuple[int, ...], glyphs: Glyphs, objects: Sequence[int], kinds: Sequence[str],
                 motions: Sequence[str]):
        self.rng, self.r, self.frames, self.split = rng, resolution, frames, split
        self.vocab, self.glyphs, self.objects, self.kinds = vocab, glyphs, list(objects), list(kinds)
        self.motions = list(motions)
        self.plan = _vocabulary_plan(vocab, glyphs)
        k = MAX_OBJECTS
        self.offsets = np.zeros((frames, k, 2), np.int64)
        self.visible = np.zeros((frames, k), bool)
        self.labels = np.full((frames, k), -1, np.int64)
        self.sizes = np.zeros((frames, k), np.int64)
        self.starts = np.zeros((frames, k, 2), np.int64)
        self.backgrounds: list[tuple[str, ...]] = [()] * frames
        self.cuts = np.zeros(frames, bool)
        self.segments: list[Segment] = []
        self.scenes: list[_Scene] = []
        self.clauses: list[tuple[str, int | None, str, str]] = []  # (separator, subject id, phrase, verb)

    # --- scenes

    def _draw_scene(self, first_frame: int) -> _Scene:
        count = int(self.objects[self.rng.integers(len(self.objects))])
        kind = self.kinds[self.rng.integers(len(self.kinds))]
        if count == 1:
            label, b = _pick(self.rng, self.plan.singles[(self.split, kind)], f"(emoji, {kind} background) pairs",
                             self.split)
            labels, background = [int(label)], background_options(kind)[b]
        else:
            options = background_options(kind)
            background = options[self.rng.integers(len(options))]
            labels = [int(x) for x in _pick(self.rng, self.plan.pairs[self.split], "emoji pairs", self.split)]
            labels = [labels[i] for i in self.rng.permutation(2)]
        lo, hi = (round(f * self.r) for f in SIZE_FRACTIONS[count])
        slots = [_Slot(lab, int(self.rng.integers(lo, hi + 1)), True) for lab in labels]
        if count == 2 and "appear" in self.motions and self.rng.random() < HIDDEN_START_PROBABILITY:
            slots[1].visible = False
        self.scenes.append(_Scene(tuple(background), slots, first_frame))  # kept: clause subjects are slot ids
        return self.scenes[-1]

    def _new_scene(self, old: _Scene, first_frame: int) -> _Scene:
        for _ in range(_MAX_SCENE_TRIES):
            scene = self._draw_scene(first_frame)
            if scene.background != old.background or [s.label for s in scene.slots] != [s.label for s in old.slots]:
                return scene
        raise ValueError(f"This vocabulary has only one {SPLITS[self.split]} scene, so a clip cannot cut to a "
                         "different one; use a larger vocabulary or leave 'cut' out of motions.")

    def _new_background(self, scene: _Scene) -> tuple[str, ...] | None:
        """Another background of the same split for ``scene``'s emoji, or None if there is none."""
        if len(scene.slots) == 1:
            options = [background_options(kind)[b] for kind in self.kinds
                       for label, b in self.plan.singles[(self.split, kind)] if label == scene.slots[0].label]
        else:
            options = [bg for kind in self.kinds for bg in background_options(kind)]
        options = [bg for bg in options if bg != scene.background]
        return tuple(options[self.rng.integers(len(options))]) if options else None

    def _intro(self, scene: _Scene) -> str:
        named = [s for s in scene.slots if s.visible]
        phrases = [_phrase(self.glyphs, self.vocab, s) for s in named]
        for s in named:
            s.mentioned = True
        where = _where(scene.background)
        return f"{' and '.join(phrases)} on {where}" if phrases else where

    def _close_scene(self, scene: _Scene, last_frame: int) -> None:
        """Draw the scene's start positions (valid for all its frames) and fill its frames' boxes."""
        frames = slice(scene.first_frame, last_frame + 1)
        ranges = [(-s.lowest, self.r - s.size - s.highest) for s in scene.slots]
        best, best_overlap = None, None
        for _ in range(_PLACEMENT_DRAWS if len(scene.slots) > 1 else 1):
            starts = np.array([[self.rng.integers(a[i], b[i] + 1) for i in range(2)] for a, b in ranges], np.int64)
            overlap = self._overlap(starts, scene, frames)
            if best is None or overlap < best_overlap:
                best, best_overlap = starts, overlap
        self.starts[frames, : len(scene.slots)] = best

    def _overlap(self, starts: np.ndarray, scene: _Scene, frames: slice) -> int:
        if len(scene.slots) < 2:
            return 0
        top_left = starts[None] + self.offsets[frames, :2]
        size = np.array([s.size for s in scene.slots])
        low = np.maximum(top_left[:, 0], top_left[:, 1])
        high = np.minimum(top_left[:, 0] + size[0], top_left[:, 1] + size[1])
        both = self.visible[frames, 0] & self.visible[frames, 1]
        return int(np.sum(np.prod(np.clip(high - low, 0, None), axis=-1) * both))

    # --- segments

    def _free(self, slot: _Slot) -> int:
        return self.r - slot.size

    def _fits(self, slot: _Slot, step: np.ndarray, length: int) -> bool:
        end = slot.offset + step * length
        lowest, highest = np.minimum(slot.lowest, end), np.maximum(slot.highest, end)
        return bool(np.all(highest - lowest <= self._free(slot)))

    def _motion(self, scene: _Scene, kind: str, length: int) -> tuple[int, str] | None:
        """``(slot, direction)`` for a motion segment, or None when no visible slot has a valid direction."""
        visible = [i for i, s in enumerate(scene.slots) if s.visible]
        if not visible:
            return None
        subject = int(visible[self.rng.integers(len(visible))])
        speed = SPEEDS[kind] * self.r // 32
        valid = [d for d, v in DIRECTIONS.items() if self._fits(scene.slots[subject], speed * np.array(v), length)]
        return (subject, valid[self.rng.integers(len(valid))]) if valid else None

    def _allowed(self, scene: _Scene) -> list[str]:
        visible = any(s.visible for s in scene.slots)
        hidden = any(not s.visible for s in scene.slots)
        ok = {"still": True, "drift": visible, "fast": visible, "appear": hidden, "disappear": visible, "cut": True}
        return [k for k in self.motions if ok[k]] or ["still"]

    def _copy_frame(self, t: int, scene: _Scene) -> None:
        for i, s in enumerate(scene.slots):
            self.offsets[t, i], self.visible[t, i] = s.offset, s.visible
            self.labels[t, i], self.sizes[t, i] = s.label, s.size
        self.backgrounds[t] = scene.background

    def _clause(self, separator: str, scene: _Scene | None, subject: int | None, verb: str) -> None:
        """Queue a clause; ``verb`` is in the plural form ("drift left") and agrees with the subject."""
        if subject is None:
            self.clauses.append((separator, None, "", verb))
            return
        slot = scene.slots[subject]
        phrase = _phrase(self.glyphs, self.vocab, slot)
        slot.mentioned = True
        self.clauses.append((separator, id(slot), phrase, _verb(verb, _plural(self.glyphs, self.vocab, slot))))

    def run(self) -> tuple[ClipTruth, str]:
        scene = self._draw_scene(0)
        intro = self._intro(scene)
        visible = [s for s in scene.slots if s.visible]
        intro_subject = id(visible[0]) if len(visible) == 1 else None
        self._copy_frame(0, scene)
        t, last_mover = 0, None
        while t < self.frames - 1:
            kind = self._pick_kind(scene)
            length = FRAME_BLOCK if kind == "fast" or self.frames - 1 - t == FRAME_BLOCK else \
                FRAME_BLOCK * int(self.rng.integers(1, 3))
            motion = self._motion(scene, kind, length) if kind in SPEEDS else None
            if kind == "fast" and motion is None:
                kind, length = "drift", FRAME_BLOCK
                motion = self._motion(scene, kind, length)
            segment, mover = Segment(kind, t, t + length), None
            if kind in SPEEDS:
                subject, direction = motion
                segment = replace(segment, subject=subject, direction=direction)
                verb = "drift" if kind == "drift" else "dart"
                self._clause(", then ", scene, subject, f"{verb} {DIRECTION_WORDS[direction]}")
                mover = subject
            elif kind == "still":
                if last_mover is not None and scene.slots[last_mover].visible:
                    self._clause(", then ", scene, last_mover, "stop")
                elif sum(s.visible for s in scene.slots) == 2:
                    self._clause(", then ", None, None, "both stay still")
                elif any(s.visible for s in scene.slots):
                    self._clause(", then ", scene, next(i for i, s in enumerate(scene.slots) if s.visible),
                                 "stay still")
                else:
                    self._clause(", then ", None, None, "nothing happens")
            elif kind in ("appear", "disappear"):
                options = [i for i, s in enumerate(scene.slots) if s.visible == (kind == "disappear")]
                subject = int(options[self.rng.integers(len(options))])
                segment = replace(segment, subject=subject)
                self._clause(", then ", scene, subject, kind)
                scene.slots[subject].visible = kind == "appear"
            else:
                background = self._new_background(scene) if self.rng.random() < 0.5 else None
                if background is not None:
                    scene.background = background
                    segment = replace(segment, cut="background")
                    words = background[0] if len(background) == 1 else f"into {_where(background)}"
                    self._clause("; ", None, None, f"the background turns {words}")
                else:
                    self._close_scene(scene, t)
                    scene = self._new_scene(scene, t + 1)
                    segment = replace(segment, cut="scene")
                    self._clause("; ", None, None, f"the scene cuts to {self._intro(scene)}")
                self.cuts[t + 1] = True
            self.segments.append(segment)
            for s in range(1, length + 1):
                if mover is not None:
                    slot = scene.slots[mover]
                    slot.offset = slot.offset + SPEEDS[kind] * self.r // 32 * np.array(DIRECTIONS[segment.direction])
                    slot.lowest, slot.highest = np.minimum(slot.lowest, slot.offset), np.maximum(slot.highest,
                                                                                                 slot.offset)
                self._copy_frame(t + s, scene)
            last_mover = mover
            t += length
        self._close_scene(scene, self.frames - 1)
        return self._truth(), self._caption(intro, intro_subject)

    def _pick_kind(self, scene: _Scene) -> str:
        allowed = self._allowed(scene)
        weights = np.array([KIND_WEIGHTS[k] for k in allowed])
        return allowed[int(self.rng.choice(len(allowed), p=weights / weights.sum()))]

    def _caption(self, intro: str, intro_subject: int | None) -> str:
        """Join the clauses: a clause repeating the previous one is dropped; one whose subject is the previous
        clause's (or the intro's only object, for the first clause) leaves it out ("a rocket on a blue
        background darts up, then stops")."""
        text, previous = intro, intro_subject
        for i, (separator, subject, phrase, verb) in enumerate(self.clauses):
            if i > 0 and self.clauses[i - 1] == (separator, subject, phrase, verb):
                continue  # "stays still, then stays still" says no more than "stays still"
            if i == 0:
                separator = " " if subject is not None and subject == intro_subject else "; "
            text += separator + (verb if subject is not None and subject == previous else f"{phrase} {verb}".strip())
            previous = subject
        return text

    def _truth(self) -> ClipTruth:
        used = self.labels >= 0
        positions = np.where(used[..., None], self.starts + self.offsets, 0)
        moved = np.zeros(self.frames)
        both = self.visible[1:] & self.visible[:-1] & ~self.cuts[1:, None]
        step = np.linalg.norm(positions[1:] - positions[:-1], axis=-1)
        moved[1:] = np.max(np.where(both, step, 0.0), axis=1)
        changed = np.zeros(self.frames, bool)
        changed[1:] = (moved[1:] > 0) | np.any(self.visible[1:] != self.visible[:-1], axis=1) | self.cuts[1:]
        vocab = np.array(self.vocab)
        return ClipTruth(positions.astype(np.int32), np.where(used, self.sizes, 0).astype(np.int32),
                         self.visible.copy(), np.where(used, vocab[np.maximum(self.labels, 0)], -1).astype(np.int32),
                         self.labels.astype(np.int32), tuple(self.backgrounds), moved, self.cuts.copy(), changed,
                         tuple(self.segments), SPLITS[self.split], self.r)


# ------------------------------------------------------------------------ render


def render_clip(truth: ClipTruth, glyphs: Glyphs | None = None) -> np.ndarray:
    """The clip ``[F, R, R, 3]`` uint8 of ``truth``: each frame's background, then its visible slots in slot
    order, composited in premultiplied alpha as :func:`jquant.data.scenes.render` does."""
    glyphs = glyphs or load_glyphs()
    r = truth.resolution
    sprites: dict[tuple[int, int], np.ndarray] = {}
    video = np.empty((len(truth.backgrounds), r, r, 3), np.uint8)
    for t, background in enumerate(truth.backgrounds):
        image = background_image(background, r)
        for k in np.flatnonzero(truth.visible[t]):
            key = (int(truth.glyphs[t, k]), int(truth.sizes[t, k]))
            if key not in sprites:
                sprites[key] = resize_premultiplied(glyphs.images[key[0]], key[1])
            (top, left), size = truth.positions[t, k], key[1]
            region = image[top : top + size, left : left + size]
            region[...] = sprites[key][..., :3] + (1.0 - sprites[key][..., 3:]) * region
        video[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return video


# ------------------------------------------------------------------------- API


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check(resolution: int, split: str, frames: int, objects: Sequence[int], kinds: Sequence[str],
           motions: Sequence[str]) -> int:
    if not _is_int(resolution) or resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not _is_int(frames) or frames < 1 + FRAME_BLOCK or frames > MAX_FRAMES or (frames - 1) % FRAME_BLOCK:
        raise ValueError(f"frames must be 1 + {FRAME_BLOCK}k in [{1 + FRAME_BLOCK}, {MAX_FRAMES}] (17, 33, ...; what "
                         f"a 4x temporal VAE encodes), got {frames!r}.")
    if isinstance(objects, str) or not objects or any(not _is_int(k) or k not in OBJECT_COUNTS for k in objects):
        raise ValueError(f"objects must be a non-empty list of emoji counts from {OBJECT_COUNTS}, got {objects!r}.")
    if isinstance(kinds, str) or not kinds or any(k not in BACKGROUND_KINDS for k in kinds):
        raise ValueError(f"backgrounds must be a non-empty list from {BACKGROUND_KINDS}, got {kinds!r}.")
    if isinstance(motions, str) or not motions or any(m not in SEGMENT_KINDS for m in motions):
        raise ValueError(f"motions must be a non-empty list from {SEGMENT_KINDS}, got {motions!r}.")
    return SPLITS.index(split)


def make_clip(rng: np.random.Generator | int, resolution: int = 32, split: str = "train", *, frames: int = 17,
              vocabulary: str | Sequence[str | int] = "all", objects: Sequence[int] = OBJECT_COUNTS,
              backgrounds: Sequence[str] = BACKGROUND_KINDS, motions: Sequence[str] = SEGMENT_KINDS,
              glyphs: Glyphs | None = None) -> tuple[np.ndarray, str, ClipTruth]:
    """One clip of ``split``: ``(video [F, R, R, 3] uint8, caption, truth)``; ``rng`` is a Generator or a seed.

    Each scene's emoji count is drawn from ``objects``, its background kind from ``backgrounds``; segment
    kinds come from ``motions`` (module docstring).
    """
    split_index = _check(resolution, split, frames, objects, backgrounds, motions)
    if not isinstance(rng, np.random.Generator):
        if not _is_int(rng):
            raise ValueError(f"rng must be a numpy Generator or an integer seed, got {rng!r}.")
        rng = np.random.default_rng(int(rng))
    glyphs = glyphs or load_glyphs()
    vocab = vocabulary_ids(vocabulary, glyphs)
    truth, caption = _Planner(rng, resolution, frames, split_index, vocab, glyphs, objects, backgrounds,
                              motions).run()
    return render_clip(truth, glyphs), caption, truth


def video_scenes(split: str, n: int, resolution: int = 32, seed: int = 0, *, frames: int = 17,
                 vocabulary: str | Sequence[str | int] = "all", objects: Sequence[int] = OBJECT_COUNTS,
                 backgrounds: Sequence[str] = BACKGROUND_KINDS, motions: Sequence[str] = SEGMENT_KINDS,
                 glyphs: Glyphs | None = None) -> VideoScenes:
    """``n`` clips of ``split`` from ``np.random.default_rng([seed, split index])`` (the first ``m`` of ``n``
    clips equal the ``m`` clips of the same call with ``n=m``). See :class:`VideoScenes`."""
    _check(resolution, split, frames, objects, backgrounds, motions)
    if not _is_int(n) or n <= 0:
        raise ValueError(f"n must be a positive integer number of clips, got {n!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    glyphs = glyphs or load_glyphs()
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    clips = [make_clip(rng, resolution, split, frames=frames, vocabulary=vocabulary, objects=objects,
                       backgrounds=backgrounds, motions=motions, glyphs=glyphs) for _ in range(int(n))]
    truths = [truth for _, _, truth in clips]
    return VideoScenes(np.stack([video for video, _, _ in clips]), [caption for _, caption, _ in clips],
                       np.stack([t.motion for t in truths]), np.stack([t.cuts for t in truths]), truths)


# ------------------------------------------------------------------------ sheets


def _caption_lines(caption: str, width: int) -> list[str]:
    return textwrap.wrap(caption, width=width)


def _frame_label(truth: ClipTruth, t: int) -> str:
    """What changed at frame ``t``: "cut", the motion in pixels, "+" / "-" (an object appears / vanishes)."""
    if truth.cuts[t]:
        return "cut"
    if truth.motion[t] > 0:
        return f"{truth.motion[t]:.1f}"
    if t and truth.visible[t].sum() != truth.visible[t - 1].sum():
        return "+" if truth.visible[t].sum() > truth.visible[t - 1].sum() else "-"
    return ""


def contact_sheet(path: str | Path, *, n: int = 8, resolution: int = 32, seed: int = 0, frames: int = 17,
                  vocabulary: str | Sequence[str | int] = "all", split: str = "train", tile: int = 64) -> Path:
    """Write ``n`` clips to ``path``: a PNG with one row of frames per clip (each frame enlarged to ``tile``
    pixels, nearest neighbour; under it :func:`_frame_label`, a red bar before a cut) under the caption,
    or, for a ``.gif`` path, an animated grid of the clips with their captions (4 frames per second)."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    if path.suffix.lower() not in (".png", ".gif"):
        raise ValueError(f"path must end in .png or .gif, got {str(path)!r}.")
    clips = video_scenes(split, n, resolution, seed, frames=frames, vocabulary=vocabulary)
    font = ImageFont.load_default(size=11)
    line = font.getbbox("Ag")[3] + 2
    pad = 6
    if path.suffix.lower() == ".png":
        width = pad + frames * (tile + 2) + pad
        texts = [_caption_lines(c, max(20, (width - 2 * pad) // 6)) for c in clips.captions]
        caption_h, label_h = line * max(map(len, texts)) + 4, line + 2
        row_h = caption_h + tile + label_h + pad
        sheet = Image.new("RGB", (width, pad + n * row_h), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (video, lines, truth) in enumerate(zip(clips.videos, texts, clips.truths)):
            y = pad + i * row_h
            for k, text in enumerate(lines):
                draw.text((pad, y + k * line), text, fill="black", font=font)
            for t in range(frames):
                x = pad + t * (tile + 2)
                sheet.paste(Image.fromarray(video[t]).resize((tile, tile), Image.Resampling.NEAREST),
                            (x, y + caption_h))
                if truth.cuts[t]:
                    draw.rectangle((x - 2, y + caption_h, x - 1, y + caption_h + tile), fill="red")
                draw.text((x + 2, y + caption_h + tile + 1), _frame_label(truth, t), fill="black", font=font)
        images = [sheet]
    else:
        columns, wrap = min(4, n), max(12, tile // 6)
        texts = [_caption_lines(c, wrap) for c in clips.captions]
        text_h = line * max(map(len, texts)) + 4
        rows = -(-n // columns)
        size = (pad + columns * (tile + pad), pad + rows * (tile + text_h + pad))
        images = []
        for t in range(frames):
            frame = Image.new("RGB", size, "white")
            draw = ImageDraw.Draw(frame)
            for i, (video, lines) in enumerate(zip(clips.videos, texts)):
                x, y = pad + (i % columns) * (tile + pad), pad + (i // columns) * (tile + text_h + pad)
                frame.paste(Image.fromarray(video[t]).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
                for k, text in enumerate(lines):
                    draw.text((x, y + tile + 2 + k * line), text, fill="black", font=font)
            images.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(path, optimize=True)
    else:
        images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0, optimize=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jquant.data.video_scenes sheet --out FILE.png|FILE.gif``: a contact sheet or animated grid."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jquant.data.video_scenes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sheet_cmd = commands.add_parser("sheet", help="write a contact sheet PNG or an animated GIF of captioned clips")
    sheet_cmd.add_argument("--out", type=Path, required=True, help=".png (rows of frames) or .gif (animated grid)")
    sheet_cmd.add_argument("--n", type=int, default=8, help="number of clips")
    sheet_cmd.add_argument("--resolution", type=int, default=32)
    sheet_cmd.add_argument("--frames", type=int, default=17)
    sheet_cmd.add_argument("--seed", type=int, default=0)
    sheet_cmd.add_argument("--tile", type=int, default=None, help="pixels per drawn frame (default 64 PNG, 128 GIF)")
    sheet_cmd.add_argument("--vocabulary", default="all", help='"all", a subset name, or comma-separated names')
    args = parser.parse_args(argv)
    vocabulary = [n.strip() for n in args.vocabulary.split(",")] if "," in args.vocabulary else args.vocabulary
    tile = args.tile or (128 if args.out.suffix.lower() == ".gif" else 64)
    try:
        contact_sheet(args.out, n=args.n, resolution=args.resolution, seed=args.seed, frames=args.frames,
                      vocabulary=vocabulary, tile=tile)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
