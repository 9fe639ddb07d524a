"""Captioned emoji clips with scripted motion and per-frame ground truth (pure numpy).

A clip is ``[F, R, R, 3]`` uint8 (``F = 1 + 4k`` frames, default 17; ``R`` 32 or 64) of 1-2 emoji of the
bundled atlas moving over a plain or gradient background (every frame is drawn as
:func:`jquant.data.scenes.render` draws a scene). Its motion is scripted per segment of 4 or 8 frames
(:mod:`jquant.data.motion`): still, slow drift, fast motion (up / down / left / right / diagonal),
appearance, disappearance, and scene cuts (background and/or content), so the information per frame varies
in a known way. Captions describe content and motion::

    "a rocket on a blue background darts up, then stops"
    "a dog face on a white background drifts left; the scene cuts to a red apple on a green background"

Ground truth (:class:`~jquant.data.motion.ClipTruth`) gives per frame and object slot the box (top, left,
size), visibility, glyph and label; per frame the background, the motion magnitude (the largest Euclidean
displacement, in pixels, of an object visible in both frames ``t - 1`` and ``t``; 0 for frame 0), scene-cut
flags and ``changed`` (frame ``t`` differs from frame ``t - 1``: motion, an object appearing or vanishing,
or a cut); and the segment list: what a dynamic-frame-rate method is checked against.

Splits are those of the image set: every scene of a clip (the stretch between cuts) is a composition unit of
the clip's split, so held-out emoji and compositions stay out of train as in :mod:`jquant.data.scenes`.
Deterministic from a seed: ``video_scenes(split, n, resolution, seed)`` draws from
``np.random.default_rng([seed, split index])``.

``python -m jquant.data.video_scenes sheet --out FILE.png|FILE.gif`` draws a contact sheet (one row of
frames per clip, motion and cuts marked) or an animated GIF grid.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jquant.data.emoji import Glyphs, load_glyphs
from jquant.data.motion import (
    FRAME_BLOCK,
    OBJECT_COUNTS,
    SEGMENT_KINDS,
    ClipTruth,
    plan_clip,
)
from jquant.data.scenes import (
    BACKGROUND_KINDS,
    RESOLUTIONS,
    SPLITS,
    _is_int,
    background_image,
    resize_premultiplied,
    vocabulary_ids,
)

MAX_FRAMES = 65


class VideoScenes(NamedTuple):
    """``videos [n, F, R, R, 3]`` uint8, ``captions``, ``motion [n, F]`` float64 and ``cuts [n, F]`` bool
    (stacked from the truths), and each clip's :class:`~jquant.data.motion.ClipTruth`."""

    videos: np.ndarray
    captions: list[str]
    motion: np.ndarray
    cuts: np.ndarray
    truths: list[ClipTruth]


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
    kinds come from ``motions`` (the rules are in :mod:`jquant.data.motion`).
    """
    split_index = _check(resolution, split, frames, objects, backgrounds, motions)
    if not isinstance(rng, np.random.Generator):
        if not _is_int(rng):
            raise ValueError(f"rng must be a numpy Generator or an integer seed, got {rng!r}.")
        rng = np.random.default_rng(int(rng))
    glyphs = glyphs or load_glyphs()
    vocab = vocabulary_ids(vocabulary, glyphs)
    truth, caption = plan_clip(rng, resolution, frames, split_index, vocab, glyphs, objects, backgrounds, motions)
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
