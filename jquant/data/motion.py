"""Motion scripts for the emoji clips of :mod:`jquant.data.video_scenes`: segments, per-frame ground truth, captions.

A clip of ``F = 1 + 4k`` frames has ``F - 1`` transitions, cut into segments of 4 or 8 transitions (whole
latent frames of a 4x temporal VAE: boundaries fall on frames ``4j``), each with one behaviour:

=============  =================================================================================
``still``      nothing changes: the segment's frames are identical
``drift``      one object moves ``R/32`` pixels per frame along each moving axis (4 or 8 frames)
``fast``       one object moves ``3R/32`` pixels per frame along each moving axis (4 frames)
``appear``     a hidden object of the scene appears on the segment's first transition, then stills
``disappear``  a visible object vanishes on the segment's first transition, then stills
``cut``        on the first transition the background changes (``cut="background"``) or a new scene
               (new emoji, sizes, positions and background) replaces the old one (``cut="scene"``)
=============  =================================================================================

Directions: up, down, left, right and the four diagonals (a diagonal moves both axes by the speed, so its
displacement is ``sqrt(2)`` times longer). Positions are whole pixels, so still frames are bit-identical and a
moving object shifts by exact pixel counts. Objects stay inside the frame: a segment's direction is drawn
among those that keep some start position valid for all of the scene's frames (the offsets' per-axis extent
must fit in the free space ``R - size``), the start positions are drawn when the scene ends (the least
overlapping of 8 draws), and a ``fast`` segment with no valid direction becomes a 4-frame ``drift``, which
always has one (its displacement is at most half the free space). Two objects may overlap; slot 1 is drawn
over slot 0.

Each segment's kind is drawn with weights :data:`KIND_WEIGHTS` among those of ``motions`` that the state
allows (motion and ``disappear`` need a visible object, ``appear`` a hidden one); ``still`` is used when none
is. A scene's emoji count is drawn from ``objects``, and one emoji is ``SIZE_FRACTIONS[1]`` of ``R`` wide, two
``SIZE_FRACTIONS[2]``; a two-emoji scene starts with its second object hidden with probability 1/3 when
``appear`` is allowed. Every scene is one composition unit of the clip's split (the plan of
:mod:`jquant.data.scenes`): a (glyph, background) pair for one emoji, a glyph pair for two; a background cut
keeps the unit in the split.

Captions name the first scene, then one clause per segment; a clause repeating the previous one is dropped,
and one about the previous clause's subject leaves the subject out::

    "a rocket on a blue background darts up, then stops"
    "a dog face on a white background drifts left; the scene cuts to a red apple on a green background"
    "a frog and grapes on a red to blue gradient; both stay still, then the frog drifts down and to the right"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from jquant.data.emoji import Glyphs
from jquant.data.scenes import SPLITS, _pick, _vocabulary_plan, background_options

FRAME_BLOCK = 4  # transitions per latent frame of a 4x temporal VAE
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
SIZE_FRACTIONS = {1: (0.4, 0.5), 2: (0.3, 0.36)}
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
            one_block = kind == "fast" or self.frames - 1 - t == FRAME_BLOCK
            segment = Segment(kind, t, t + FRAME_BLOCK * (1 if one_block else int(self.rng.integers(1, 3))))
            if kind in SPEEDS:
                segment = self._move(scene, segment)
            elif kind == "still":
                self._still(scene, last_mover)
            elif kind in ("appear", "disappear"):
                segment = self._toggle(scene, segment)
            else:
                scene, segment = self._cut(scene, segment)
            self.segments.append(segment)
            self._advance(scene, segment)
            last_mover = segment.subject if segment.kind in SPEEDS else None
            t = segment.end
        self._close_scene(scene, self.frames - 1)
        return self._truth(), self._caption(intro, intro_subject)

    def _move(self, scene: _Scene, segment: Segment) -> Segment:
        length = segment.end - segment.start
        motion = self._motion(scene, segment.kind, length)
        if motion is None:  # only a fast segment can lack a direction; a 4-frame drift always has one
            segment = replace(segment, kind="drift", end=segment.start + FRAME_BLOCK)
            motion = self._motion(scene, "drift", FRAME_BLOCK)
        subject, direction = motion
        verb = "drift" if segment.kind == "drift" else "dart"
        self._clause(", then ", scene, subject, f"{verb} {DIRECTION_WORDS[direction]}")
        return replace(segment, subject=subject, direction=direction)

    def _still(self, scene: _Scene, last_mover: int | None) -> None:
        visible = [i for i, s in enumerate(scene.slots) if s.visible]
        if last_mover is not None and last_mover in visible:
            self._clause(", then ", scene, last_mover, "stop")
        elif len(visible) == 2:
            self._clause(", then ", None, None, "both stay still")
        elif visible:
            self._clause(", then ", scene, visible[0], "stay still")
        else:
            self._clause(", then ", None, None, "nothing happens")

    def _toggle(self, scene: _Scene, segment: Segment) -> Segment:
        options = [i for i, s in enumerate(scene.slots) if s.visible == (segment.kind == "disappear")]
        subject = int(options[self.rng.integers(len(options))])
        self._clause(", then ", scene, subject, segment.kind)
        scene.slots[subject].visible = segment.kind == "appear"
        return replace(segment, subject=subject)

    def _cut(self, scene: _Scene, segment: Segment) -> tuple[_Scene, Segment]:
        """A background cut (half of the cuts, when the split has another background for the scene's emoji)
        or a scene cut, on the segment's first transition."""
        background = self._new_background(scene) if self.rng.random() < 0.5 else None
        self.cuts[segment.start + 1] = True
        if background is not None:
            scene.background = background
            words = background[0] if len(background) == 1 else f"into {_where(background)}"
            self._clause("; ", None, None, f"the background turns {words}")
            return scene, replace(segment, cut="background")
        self._close_scene(scene, segment.start)
        scene = self._new_scene(scene, segment.start + 1)
        self._clause("; ", None, None, f"the scene cuts to {self._intro(scene)}")
        return scene, replace(segment, cut="scene")

    def _advance(self, scene: _Scene, segment: Segment) -> None:
        """Fill the segment's frames after its first, moving its subject when it is a motion segment."""
        for t in range(segment.start + 1, segment.end + 1):
            if segment.kind in SPEEDS:
                slot = scene.slots[segment.subject]
                step = SPEEDS[segment.kind] * self.r // 32 * np.array(DIRECTIONS[segment.direction])
                slot.offset = slot.offset + step
                slot.lowest, slot.highest = np.minimum(slot.lowest, slot.offset), np.maximum(slot.highest, slot.offset)
            self._copy_frame(t, scene)

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


def plan_clip(rng: np.random.Generator, resolution: int, frames: int, split: int, vocab: tuple[int, ...],
              glyphs: Glyphs, objects: Sequence[int], backgrounds: Sequence[str],
              motions: Sequence[str]) -> tuple[ClipTruth, str]:
    """One clip's script ``(truth, caption)`` (module docstring) for split index ``split`` over the atlas indices
    ``vocab``; arguments are checked by :func:`jquant.data.video_scenes.make_clip`."""
    return _Planner(rng, resolution, frames, split, vocab, glyphs, objects, backgrounds, motions).run()
