"""The motion-scripted emoji clips: determinism, frame-count rules, ground truth against the pixels, splits,
captions, the contact-sheet CLI."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from jquant.data import video_scenes as vs
from jquant.data.emoji import load_glyphs
from jquant.data.motion import DIRECTION_WORDS, DIRECTIONS, SPEEDS
from jquant.data.scenes import SPLITS, background_image, unit_split, vocabulary_ids
from jquant.data.video_scenes import make_clip, video_scenes


@pytest.fixture(scope="module")
def glyphs():
    return load_glyphs()


@pytest.fixture(scope="module")
def clips(glyphs):
    """A mix of resolutions, lengths and splits over the full vocabulary (held-out emoji included)."""
    seed = int(np.random.default_rng().integers(1 << 20))
    return [video_scenes("train", 16, 32, seed, glyphs=glyphs),
            video_scenes("test", 8, 64, seed, frames=9, glyphs=glyphs),
            video_scenes("validation", 8, 32, seed, frames=33, glyphs=glyphs)]


def _each(clips):
    for batch in clips:
        yield from zip(batch.videos, batch.captions, batch.truths)


def test_same_seed_same_bytes_and_prefixes(glyphs):
    a = video_scenes("train", 5, 32, 7, glyphs=glyphs)
    b = video_scenes("train", 5, 32, 7)
    assert a.videos.dtype == np.uint8 and a.videos.shape == (5, 17, 32, 32, 3)
    assert a.videos.tobytes() == b.videos.tobytes() and a.captions == b.captions
    for ta, tb in zip(a.truths, b.truths):
        assert ta.segments == tb.segments and ta.backgrounds == tb.backgrounds
        for x, y in zip(ta[:5] + ta[6:9], tb[:5] + tb[6:9]):
            np.testing.assert_array_equal(x, y)
    prefix = video_scenes("train", 2, 32, 7, glyphs=glyphs)
    assert prefix.videos.tobytes() == a.videos[:2].tobytes() and prefix.captions == a.captions[:2]
    other = video_scenes("train", 5, 32, 8, glyphs=glyphs)
    assert other.videos.tobytes() != a.videos.tobytes()
    video, caption, _ = make_clip(3, glyphs=glyphs)
    assert video.tobytes() == make_clip(3, glyphs=glyphs)[0].tobytes() and caption == make_clip(3, glyphs=glyphs)[1]


def test_frame_counts_and_segments(clips):
    for video, _, truth in _each(clips):
        frames = video.shape[0]
        assert (frames - 1) % 4 == 0 and len(truth.backgrounds) == frames
        assert truth.positions.shape == (frames, 2, 2) and truth.motion.shape == truth.cuts.shape == (frames,)
        bounds = [(s.start, s.end) for s in truth.segments]
        assert bounds[0][0] == 0 and bounds[-1][1] == frames - 1
        assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
        for s in truth.segments:
            assert s.start % 4 == 0 and s.end - s.start in ((4,) if s.kind == "fast" else (4, 8))
    for frames in (5, 9, 33):
        assert video_scenes("train", 2, 32, 0, frames=frames).videos.shape[1] == frames
    for frames in (1, 4, 16, 18, 69):
        with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
            video_scenes("train", 1, 32, 0, frames=frames)


def _expected_step(truth, segment, resolution):
    return SPEEDS[segment.kind] * resolution // 32 * np.array(DIRECTIONS[segment.direction])


def test_ground_truth_matches_the_pixels(clips, glyphs):
    for video, _, truth in _each(clips):
        r = video.shape[1]
        differs = np.array([False] + [np.any(video[t] != video[t - 1]) for t in range(1, len(video))])
        np.testing.assert_array_equal(differs, truth.changed)
        shown = np.any(truth.visible[1:] != truth.visible[:-1], axis=1)
        np.testing.assert_array_equal(truth.changed[1:], (truth.motion[1:] > 0) | shown | truth.cuts[1:])
        assert not truth.changed[0] and not truth.cuts[0] and truth.motion[0] == 0
        used = truth.labels >= 0
        assert np.all(truth.positions[used] >= 0) and np.all(truth.positions[used] + truth.sizes[used][:, None] <= r)
        np.testing.assert_array_equal(truth.glyphs[used], np.array(vocabulary_ids("all", glyphs))[truth.labels[used]])
        for s in truth.segments:
            inner = slice(s.start + 2, s.end + 1)  # transitions after the first
            if s.kind in SPEEDS:
                step = _expected_step(truth, s, r)
                moves = np.diff(truth.positions[s.start : s.end + 1, s.subject], axis=0)
                np.testing.assert_array_equal(moves, np.broadcast_to(step, moves.shape))
                np.testing.assert_allclose(truth.motion[s.start + 1 : s.end + 1], np.linalg.norm(step))
                assert np.all(truth.visible[s.start : s.end + 1, s.subject])
            else:
                assert not truth.changed[inner].any() and truth.motion[s.start + 1] == 0
                assert truth.changed[s.start + 1] == (s.kind != "still")
            if s.kind in ("appear", "disappear"):
                before, after = truth.visible[s.start : s.start + 2, s.subject]
                assert after == (s.kind == "appear") and before != after
            assert truth.cuts[s.start + 1] == (s.kind == "cut") and not truth.cuts[inner].any()
            if s.cut == "background":
                t = s.start + 1
                assert truth.backgrounds[t] != truth.backgrounds[t - 1]
                np.testing.assert_array_equal(truth.labels[t], truth.labels[t - 1])
                np.testing.assert_array_equal(truth.positions[t], truth.positions[t - 1])
        _check_boxes(video, truth)


def _check_boxes(video, truth):
    """Pixels outside the visible boxes are the background's; a visible object clear of the other fills its box."""
    r = video.shape[1]
    for t, frame in enumerate(video):
        background = np.clip(np.rint(background_image(truth.backgrounds[t], r)), 0, 255).astype(np.uint8)
        inside = np.zeros((r, r), bool)
        boxes = []
        for k in np.flatnonzero(truth.visible[t]):
            (top, left), size = truth.positions[t, k], truth.sizes[t, k]
            inside[top : top + size, left : left + size] = True
            boxes.append((top, left, size))
        np.testing.assert_array_equal(frame[~inside], background[~inside])
        for i, (top, left, size) in enumerate(boxes):
            others = [b for j, b in enumerate(boxes) if j != i]
            if any(top < ot + os and ot < top + size and left < ol + os and ol < left + size for ot, ol, os in others):
                continue
            drawn = np.argwhere(np.any(frame != background, axis=-1) & inside)
            drawn = drawn[(drawn[:, 0] >= top) & (drawn[:, 0] < top + size) & (drawn[:, 1] >= left)
                          & (drawn[:, 1] < left + size)]
            extent = drawn.max(axis=0) - drawn.min(axis=0) + 1
            assert extent.max() >= size - 2, (t, extent, size)  # glyphs span (almost) their box


def _unit_split(glyphs, names, background):
    if any(n in glyphs.held_out for n in names):
        return 2
    if len(names) == 1:
        return unit_split(f"single/{names[0]}/{'/'.join(background)}")
    first, second = sorted(names)
    return unit_split(f"pair/{first}/{second}")


def test_every_scene_is_a_composition_unit_of_the_clip_split(clips, glyphs):
    units = {s: set() for s in SPLITS}
    for _, _, truth in _each(clips):
        split = SPLITS.index(truth.split)
        for t in range(len(truth.backgrounds)):
            names = tuple(glyphs.names[g] for g in truth.glyphs[t] if g >= 0)
            assert 1 <= len(names) <= 2
            assert _unit_split(glyphs, names, truth.backgrounds[t]) == split
            units[truth.split].add((frozenset(names), truth.backgrounds[t] if len(names) == 1 else None))
        if truth.split != "test":
            assert not {glyphs.names[g] for g in truth.glyphs.ravel() if g >= 0} & glyphs.held_out
    assert not units["train"] & units["test"] and not units["train"] & units["validation"]


def test_captions_name_the_objects_and_motions(clips, glyphs):
    for _, caption, truth in _each(clips):
        assert f"{truth.backgrounds[0][0]} " in caption
        for g in np.unique(truth.glyphs[truth.visible]):
            assert glyphs.names[g] in caption, (glyphs.names[g], caption)
        for s in truth.segments:
            if s.kind in SPEEDS:
                verb = "drift" if s.kind == "drift" else "dart"
                assert f"{verb}s {DIRECTION_WORDS[s.direction]}" in caption or \
                       f"{verb} {DIRECTION_WORDS[s.direction]}" in caption, (s, caption)
            elif s.kind in ("appear", "disappear"):
                assert re.search(rf"\b{s.kind}s?\b", caption), (s, caption)
            elif s.cut == "scene":
                assert "the scene cuts to" in caption
            elif s.cut == "background":
                assert "the background turns" in caption


def test_motions_restrict_the_script(glyphs):
    still = video_scenes("train", 4, 32, 1, motions=("still",), glyphs=glyphs)
    assert all(np.all(v == v[:1]) for v in still.videos) and not still.motion.any()
    assert all("stay" in c for c in still.captions)
    drift = video_scenes("train", 4, 32, 1, motions=("drift",), objects=(1,), glyphs=glyphs)
    assert all(s.kind == "drift" for t in drift.truths for s in t.segments)
    assert np.all(drift.motion[:, 1:] >= 1) and np.all(drift.motion[:, 1:] <= np.sqrt(2))


def test_bad_input_names_the_argument():
    for kwargs, match in [({"resolution": 48}, "resolution"), ({"split": "dev"}, "split"),
                          ({"objects": (3,)}, "objects"),
                          ({"motions": ("jump",)}, "motions"), ({"backgrounds": "plain"}, "backgrounds"),
                          ({"n": 0}, "n must be"), ({"seed": -1}, "seed")]:
        args = {"split": "train", "n": 1, "resolution": 32, "seed": 0} | kwargs
        with pytest.raises(ValueError, match=match):
            video_scenes(**args)
    with pytest.raises(ValueError, match="rng"):
        make_clip("seed")


def test_sheet_cli_writes_png_and_gif(tmp_path):
    from PIL import Image

    vs.main(["sheet", "--out", str(tmp_path / "sheet.png"), "--n", "2", "--frames", "5", "--tile", "32"])
    assert Image.open(tmp_path / "sheet.png").size[0] > 5 * 32
    vs.main(["sheet", "--out", str(tmp_path / "clips.gif"), "--n", "3", "--frames", "9", "--tile", "48"])
    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == 9
    with pytest.raises(SystemExit):
        vs.main(["sheet", "--out", str(tmp_path / "sheet.jpg")])
