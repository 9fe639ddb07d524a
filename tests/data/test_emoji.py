"""The bundled emoji atlas and the captioned scenes built from it.

Everything runs on the shipped assets; only the builder test needs the Debian packages (a folder named
by ``JQUANT_EMOJI_DEBS`` holding the two ``.deb`` files, or the installed font and ``emoji-test.txt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jquant.atomic import OutputPathError
from jquant.data import emoji, scenes
from jquant.data.emoji import DEFAULT_EMOJI_DIR, build, caption_phrase, load_glyphs, parse_emoji_test, select_entries
from jquant.data.scenes import COLORS, SPLITS, emoji_scenes, make_scene, render, resize_premultiplied

MANIFEST = json.loads((DEFAULT_EMOJI_DIR / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def glyphs() -> emoji.Glyphs:
    return load_glyphs()


# ------------------------------------------------------------------- atlas


def test_atlas_matches_manifest(glyphs):
    data = (DEFAULT_EMOJI_DIR / MANIFEST["atlas"]["file"]).read_bytes()
    assert len(data) == MANIFEST["atlas"]["bytes"] and hashlib.sha256(data).hexdigest() == MANIFEST["atlas"]["sha256"]
    assert sum(p.stat().st_size for p in DEFAULT_EMOJI_DIR.iterdir()) < 6_000_000
    n = len(MANIFEST["glyphs"])
    assert glyphs.images.shape == (n, 64, 64, 4) and glyphs.images.dtype == np.uint8
    assert list(glyphs.names) == [g["name"] for g in MANIFEST["glyphs"]] and len(set(glyphs.names)) == n
    alpha = glyphs.images[..., 3]
    assert np.all(glyphs.images[..., :3][alpha == 0] == 0)
    # every glyph was cropped to its drawing and centred: it spans (almost) the full width or height
    rows, cols = alpha.max(axis=2) > 0, alpha.max(axis=1) > 0
    assert np.all(np.maximum(rows.sum(1), cols.sum(1)) >= 60)
    for name in MANIFEST["held_out_emoji"] + [n for s in MANIFEST["subsets"].values() for n in s]:
        assert name in glyphs.names
    recommended = set(glyphs.subsets[glyphs.recommended_subset])
    assert len(recommended) == 32 and not recommended & glyphs.held_out
    assert abs(len(glyphs.held_out) - MANIFEST["held_out_emoji_fraction"] * n) <= 1
    licence = (DEFAULT_EMOJI_DIR / MANIFEST["licence"]["file"]).read_text()
    assert "SIL OPEN FONT LICENSE Version 1.1" in licence and "Apache-2.0" in licence
    readme = (DEFAULT_EMOJI_DIR / "README.md").read_text()
    assert "Apache License 2.0" in readme and "Open Font License" in readme


def test_load_glyphs_refuses_a_corrupted_atlas(tmp_path):
    folder = tmp_path / "emoji"
    shutil.copytree(DEFAULT_EMOJI_DIR, folder)
    atlas = folder / MANIFEST["atlas"]["file"]
    data = bytearray(atlas.read_bytes())
    data[len(data) // 2] ^= 0xFF
    atlas.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_glyphs(folder)
    with pytest.raises(FileNotFoundError, match="python -m jquant.data.emoji build"):
        load_glyphs(tmp_path / "absent")


def test_selection_rules_on_synthetic_emoji_test():
    text = "\n".join([
        "# group: Food & Drink", "# subgroup: food-fruit",
        "1F34E ; fully-qualified # 🍎 E0.6 red apple",
        "1F347 ; fully-qualified # 🍇 E0.6 grapes",
        "1F34F ; unqualified # 🍏 E0.6 green apple",
        "1F95D ; fully-qualified # 🥝 E3.0 kiwi fruit slice",  # three words
        "# group: Activities", "# subgroup: game",
        "1FA85 ; fully-qualified # 🪅 E13.0 piñata",
        "0023 FE0F 20E3 ; fully-qualified # #️⃣ E0.6 keycap: #",
        "# group: People & Body", "# subgroup: hand-fingers-open",
        "1F44B ; fully-qualified # 👋 E0.6 waving hand",
        "1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone",
        "# group: Travel & Places", "# subgroup: sky & weather",
        "2600 FE0F ; fully-qualified # ☀️ E0.7 sun",
        "2600 ; unqualified # ☀ E0.7 sun",
        "# subgroup: time", "231B ; fully-qualified # ⌛ E0.6 hourglass done",
        "# group: Animals & Nature", "# subgroup: animal-mammal",
        "1F415 200D 1F9BA ; fully-qualified # 🐕‍🦺 E12.0 service dog",
        "# group: Flags", "# subgroup: flag", "1F3C1 ; fully-qualified # 🏁 E0.6 chequered flag",
    ])
    kept = select_entries(parse_emoji_test(text))
    assert [e.name for e in kept] == ["red apple", "grapes", "pinata", "sun"]
    assert kept[-1].codepoints == (0x2600, 0xFE0F)


@pytest.mark.parametrize("name, phrase", [("red apple", "a red apple"), ("octopus", "an octopus"),
                                          ("unicorn", "a unicorn"), ("grapes", "grapes"), ("bus", "a bus"),
                                          ("rhinoceros", "a rhinoceros"), ("sushi", "sushi")])
def test_caption_phrase(name, phrase):
    assert caption_phrase(name) == phrase


# ------------------------------------------------------------------ scenes


@pytest.mark.parametrize("resolution", [32, 64])
def test_scenes_are_deterministic_and_well_formed(glyphs, resolution):
    a = emoji_scenes("train", 12, resolution, seed=3, vocabulary="reference-32")
    b = emoji_scenes("train", 12, resolution, seed=3, vocabulary="reference-32")
    c = emoji_scenes("train", 12, resolution, seed=4, vocabulary="reference-32")
    head = emoji_scenes("train", 5, resolution, seed=3, vocabulary="reference-32")
    assert a.images.shape == (12, resolution, resolution, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.layouts == b.layouts
    np.testing.assert_array_equal(head.images, a.images[:5])
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions
    vocab = glyphs.subsets["reference-32"]
    assert a.labels.shape == (12, 3) and a.labels.dtype == np.int32
    for row, layout in zip(a.labels, a.layouts):
        k = len(layout.objects)
        assert list(row[:k]) == [vocab.index(o.name) for o in layout.objects] and np.all(row[k:] == -1)
        assert [glyphs.names[o.glyph] for o in layout.objects] == [o.name for o in layout.objects]
    image, caption, layout = make_scene(7, resolution, "validation", vocabulary="reference-16")
    again = make_scene(np.random.default_rng(7), resolution, "validation", vocabulary="reference-16")
    np.testing.assert_array_equal(image, again[0])
    assert caption == again[1] == layout.caption and layout.split == "validation"


def _outside_boxes(layout) -> np.ndarray:
    mask = np.ones((layout.resolution, layout.resolution), bool)
    for o in layout.objects:
        mask[o.top : o.top + o.size, o.left : o.left + o.size] = False
    return mask


@pytest.mark.parametrize("resolution", [32, 64])
def test_captions_match_layouts_and_pixels(glyphs, resolution):
    batch = emoji_scenes("train", 150, resolution, seed=0)
    seen = set()
    for image, caption, layout in zip(batch.images, batch.captions, batch.layouts):
        objects = layout.objects
        centres = [(o.top + o.size / 2, o.left + o.size / 2) for o in objects]
        # the glyphs are named in caption order, the background by its colour names
        position = 0
        for o in objects:
            position = caption.index(glyphs.phrases[o.glyph], position) + len(glyphs.phrases[o.glyph])
        assert caption.endswith(f"{layout.background[0]} background" if len(layout.background) == 1
                                else f"{layout.background[0]} to {layout.background[1]} gradient")
        relation = layout.relation
        seen.add(relation)
        if relation is not None:
            assert relation in caption
        if relation in ("to the left of", "in a row"):
            assert all(a.left + a.size <= b.left for a, b in zip(objects, objects[1:]))
        elif relation == "to the right of":
            assert objects[1].left + objects[1].size <= objects[0].left
        elif relation in ("above", "in a column"):
            assert all(a.top + a.size <= b.top for a, b in zip(objects, objects[1:]))
        elif relation == "below":
            assert objects[1].top + objects[1].size <= objects[0].top
        else:
            assert len(objects) == 1 and abs(centres[0][0] - resolution / 2) <= resolution / 10 + 1
        for o in objects:
            assert 0 <= o.top and o.top + o.size <= resolution and 0 <= o.left and o.left + o.size <= resolution
        # outside the boxes only the background shows; inside, the glyph does
        outside = _outside_boxes(layout)
        top, bottom = (np.array(COLORS[c], float) for c in (layout.background[0], layout.background[-1]))
        t = ((np.arange(resolution) + 0.5) / resolution)[:, None, None]
        expected = np.broadcast_to((1 - t) * top + t * bottom, image.shape)
        assert np.max(np.abs(image[outside] - expected[outside])) <= 0.5
        for o in objects:
            box = (slice(o.top, o.top + o.size), slice(o.left, o.left + o.size))
            alpha = resize_premultiplied(glyphs.images[o.glyph], o.size)[..., 3]
            visible = alpha > 0.9
            colour = resize_premultiplied(glyphs.images[o.glyph], o.size)[..., :3][visible] / alpha[visible, None]
            np.testing.assert_allclose(image[box][visible], colour, atol=0.5 + 0.1 * 255)
    assert seen == {None, "to the left of", "to the right of", "above", "below", "in a row", "in a column"}


def test_resize_matches_pillow(glyphs):
    from PIL import Image

    for index in range(0, len(glyphs.names), 97):
        for size in (9, 16, 27, 40, 64):
            ours = resize_premultiplied(glyphs.images[index], size)
            theirs = np.asarray(Image.fromarray(glyphs.images[index]).resize((size, size), Image.Resampling.BILINEAR),
                                np.float64)
            alpha = theirs[..., 3:] / 255
            # Pillow rounds its premultiplied intermediate to 8 bits: 2.5 levels of 255 is its precision here
            np.testing.assert_allclose(ours[..., :3], theirs[..., :3] * alpha, atol=2.5)
            np.testing.assert_allclose(ours[..., 3:], alpha, atol=2.5 / 255)


def test_render_composites_over_the_background(glyphs):
    _, _, layout = make_scene(11, 64, "train", vocabulary="reference-32", objects=(1,), backgrounds=("plain",))
    (o,) = layout.objects
    fg = resize_premultiplied(glyphs.images[o.glyph], o.size)
    background = np.array(COLORS[layout.background[0]], np.float64)
    expected = np.broadcast_to(background, (64, 64, 3)).copy()
    expected[o.top : o.top + o.size, o.left : o.left + o.size] = fg[..., :3] + (1 - fg[..., 3:]) * background
    np.testing.assert_array_equal(render(layout, glyphs), np.clip(np.rint(expected), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------ splits


def _units(layout) -> set:
    names = [o.name for o in layout.objects]
    if len(names) == 1:
        return {(names[0], layout.background)}
    return {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]}


def _split_units(split: str, objects: tuple[int, ...], n: int, vocabulary) -> list[set]:
    batch = emoji_scenes(split, n, 32, seed=1, vocabulary=vocabulary, objects=objects, backgrounds=("plain",))
    assert all(layout.split == split for layout in batch.layouts)
    return [_units(layout) for layout in batch.layouts]


@pytest.mark.parametrize("objects", [(1,), (2,)])
def test_held_out_compositions_are_disjoint_and_cover_the_vocabulary(objects):
    """With 16 emoji (120 pairs, 160 emoji-colour units) a few thousand scenes see every unit of each split."""
    found = {s: set().union(*_split_units(s, objects, 1500, "reference-16")) for s in SPLITS}
    assert not found["train"] & found["validation"] and not found["train"] & found["test"]
    assert not found["validation"] & found["test"]
    total = 120 if objects == (2,) else 16 * len(COLORS)
    assert sum(map(len, found.values())) == total and min(map(len, found.values())) > 0
    if objects == (2,):  # three-glyph scenes: train holds only train pairs, held-out scenes a pair of their split
        assert all(units <= found["train"] for units in _split_units("train", (3,), 300, "reference-16"))
        for units in _split_units("validation", (3,), 300, "reference-16"):
            assert units & found["validation"] and not units & found["test"]
        for units in _split_units("test", (3,), 300, "reference-16"):
            assert units & found["test"]


def test_held_out_emoji_only_in_test(glyphs):
    shown = {}
    for split in SPLITS:
        batch = emoji_scenes(split, 600, 32, seed=2)
        shown[split] = {o.name for layout in batch.layouts for o in layout.objects}
        assert all(o.name in batch.captions[i] for i, layout in enumerate(batch.layouts) for o in layout.objects)
    assert not shown["train"] & glyphs.held_out and not shown["validation"] & glyphs.held_out
    assert shown["test"] & glyphs.held_out


def test_pair_splits_do_not_depend_on_the_vocabulary(glyphs):
    small = glyphs.subsets["reference-16"]
    large = list(small) + [n for n in glyphs.subsets["reference-32"] if n not in small]
    held = {s: set().union(*_split_units(s, (2,), 1500, "reference-16")) for s in SPLITS}
    for split in SPLITS:
        for units in _split_units(split, (2,), 400, large):
            for other in SPLITS:
                if other != split:
                    assert not units & held[other]


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, argument", [
    ({"resolution": 48}, "resolution"), ({"resolution": 32.0}, "resolution"), ({"split": "dev"}, "split"), ({"n": 0}, "n must"), ({"n": -3}, "n must"),
    ({"objects": (4,)}, "objects"), ({"objects": ()}, "objects"), ({"backgrounds": ("stripes",)}, "backgrounds"),
    ({"backgrounds": "plain"}, "backgrounds"),
    ({"vocabulary": "everything"}, "vocabulary"), ({"vocabulary": ["red apple", "red apple"]}, "distinct"),
    ({"vocabulary": ["red apple", "no such emoji"]}, "Unknown emoji name"), ({"seed": -1}, "seed"),
    ({"vocabulary": ["red apple", "banana"], "objects": (3,)}, "triples"),
])
def test_bad_input_names_the_argument(kwargs, argument):
    call = {"split": "train", "n": 2, "resolution": 32, **kwargs}
    with pytest.raises(ValueError, match=argument):
        emoji_scenes(**call)


def test_contact_sheet(tmp_path):
    from PIL import Image

    path = tmp_path / "sheet.png"
    scenes.main(["sheet", "--out", str(path), "--resolution", "32", "--vocabulary", "reference-16"])
    scenes_shown = emoji_scenes("train", 15, 32, 0, vocabulary="reference-16").images
    with Image.open(path) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.shape[1] == 5 * (128 + 6) + 6 and pixels.shape[0] > 3 * (128 + 6)
    # the first tile is the first scene, enlarged 4 times
    np.testing.assert_array_equal(pixels[6 : 6 + 128, 6 : 6 + 128], scenes_shown[0].repeat(4, 0).repeat(4, 1))


# ------------------------------------------------------------------ builder


def _sources() -> dict[str, Path] | None:
    debs = os.environ.get("JQUANT_EMOJI_DEBS")
    if debs:
        found = {key: sorted(Path(debs).glob(f"{package}_*.deb"))
                 for key, package in (("deb", emoji.FONT_PACKAGE), ("unicode_deb", emoji.UNICODE_PACKAGE))}
        return {key: paths[-1] for key, paths in found.items() if paths} if all(found.values()) else None
    font, test = Path("/") / emoji.FONT_IN_DEB, Path("/") / emoji.EMOJI_TEST_IN_DEB
    return {"font": font, "emoji_test": test} if font.is_file() and test.is_file() else None


def test_build_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(OutputPathError, match="out_dir"):
        build(tmp_path, font=tmp_path / "absent.ttf", emoji_test=tmp_path / "absent.txt")
    assert (tmp_path / "mine.txt").read_text() == "user data"


@pytest.mark.skipif(_sources() is None, reason="needs the Debian packages: set JQUANT_EMOJI_DEBS to a folder "
                    "with fonts-noto-color-emoji_*.deb and unicode-data_*.deb")
def test_build_is_deterministic_and_reproduces_the_shipped_atlas(tmp_path, glyphs):
    """Same inputs and Pillow as the shipped atlas: the same bytes; otherwise two builds agree byte for byte."""
    from PIL import __version__ as pillow

    manifest = build(tmp_path / "a", **_sources())
    with pytest.raises(OutputPathError, match="--overwrite"):
        build(tmp_path / "a", **_sources())
    same_inputs = manifest["sources"] == MANIFEST["sources"]
    if same_inputs and pillow == MANIFEST["render"]["pillow"]:
        reference = DEFAULT_EMOJI_DIR
    else:
        reference = tmp_path / "b"
        build(reference, **_sources())
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (reference / name).read_bytes(), name
    if same_inputs:
        built = load_glyphs(tmp_path / "a")
        assert built.names == glyphs.names and manifest["held_out_emoji"] == MANIFEST["held_out_emoji"]
        assert np.abs(built.images.astype(int) - glyphs.images).max() <= 2  # another Pillow: last-bit resampling
