"""The bundled emoji glyph atlas: colour emoji rendered once from Debian packages, shipped compact.

Sources (package registries only, never a hub):

* Debian ``fonts-noto-color-emoji``: ``NotoColorEmoji.ttf`` (font OFL-1.1, emoji images Apache-2.0).
* Debian ``unicode-data``: ``emoji/emoji-test.txt`` (Unicode emoji 15.0), which gives every emoji's
  group, subgroup and CLDR short name ("red apple", "dog face", "sun"); the name is the caption.

Build once (downloads both ``.deb`` files with ``apt-get download`` into a temporary folder unless
given)::

    python -m jquant.data.emoji build [--deb PATH | --font PATH] [--unicode-deb PATH | --emoji-test PATH]
                                      [--out jquant/assets/emoji] [--overwrite]
    python -m jquant.data.scenes sheet --out experiments/results/emoji_scenes.png

``build`` keeps fully-qualified single-code-point emoji (so no skin-tone modifiers, ZWJ sequences,
keycaps or flags) of the groups and subgroups in :data:`KEPT_GROUPS` minus :data:`DROPPED_SUBGROUPS`
(people, faces, clocks, documents and signs look alike at 32x32), with ASCII names of at most
:data:`MAX_NAME_WORDS` words. Each is drawn with Pillow at the font's bitmap strike
(``ImageFont.truetype(font, 109)``, ``embedded_color=True``) on a 136x128 canvas; one that draws
nothing, or draws the font's missing-glyph image, is dropped. The drawing is cropped to its alpha
bounding box, centred on a transparent square and resized to ``ATLAS_SIZE`` x ``ATLAS_SIZE`` with
Lanczos in premultiplied alpha (Pillow's RGBA resize), and its RGB is zeroed where alpha is 0.

Shipped in ``jquant/assets/emoji/``: ``glyphs.npy.xz`` (an xz-compressed ``.npy`` of uint8
``[N, 64, 64, 4]`` straight RGBA; xz is a third smaller than PNG here), ``manifest.json`` (per glyph:
code point, name, caption phrase, group; the held-out emoji; the training subsets; sha256 of every
source and of the atlas), ``README.md`` and the font package's licence file. The same inputs give the
same bytes. :func:`load_glyphs` reads it back (checking the sha256); :mod:`jquant.data.scenes` composes
captioned scenes from it.

Recommended vocabulary for a tiny model at 32x32: ``"reference-32"`` (:data:`REFERENCE_SUBSET`,
32 visually distinct emoji; ``"reference-16"`` is its first half).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import lzma
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jquant.atomic import atomic_folder, check_output_folder
from jquant.data.corpus import _archive_record, _find_deb, _run

DEFAULT_EMOJI_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji"
ATLAS_FILE = "glyphs.npy.xz"
LICENSE_FILE = "LICENSE-noto-emoji.txt"
ATLAS_SIZE = 64
FONT_PACKAGE, UNICODE_PACKAGE = "fonts-noto-color-emoji", "unicode-data"
FONT_IN_DEB = Path("usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
COPYRIGHT_IN_DEB = Path("usr/share/doc/fonts-noto-color-emoji/copyright")
EMOJI_TEST_IN_DEB = Path("usr/share/unicode/emoji/emoji-test.txt")
FONT_SIZE = 109  # NotoColorEmoji's only bitmap strike; other sizes fail to load
CANVAS = (136, 128)  # the strike's glyph box
MISSING_GLYPH_PROBE = "\ue000"  # a private-use code point no emoji font maps: draws the missing-glyph image

# Group -> kept subgroups (None: all). People, most faces, flags and text-like symbols are left out.
KEPT_GROUPS: dict[str, tuple[str, ...] | None] = {
    "Animals & Nature": None, "Food & Drink": None, "Travel & Places": None, "Activities": None,
    "Objects": None, "Smileys & Emotion": ("heart", "cat-face", "monkey-face", "face-costume"),
    "Symbols": ("geometric",),
}
DROPPED_SUBGROUPS = ("time", "hotel", "place-map", "book-paper", "office", "mail", "writing", "money",
                     "computer", "sound", "lock", "other-object", "medical", "science")
MAX_NAME_WORDS = 2
HELD_OUT_EMOJI_FRACTION = 0.1

REFERENCE_SUBSET = (
    "red apple", "banana", "grapes", "carrot", "dog face", "frog", "penguin", "butterfly",
    "sunflower", "deciduous tree", "rocket", "automobile", "sun", "snowflake", "fire", "red heart",
    "watermelon", "broccoli", "pizza", "doughnut", "cat face", "pig face", "octopus", "tropical fish",
    "cactus", "airplane", "house", "droplet", "rainbow", "soccer ball", "basketball", "light bulb",
)
SUBSETS = {"reference-32": REFERENCE_SUBSET, "reference-16": REFERENCE_SUBSET[:16]}
RECOMMENDED_SUBSET = "reference-32"

# Names that read as mass nouns take no article in captions ("sushi to the left of a frog").
MASS_NOUNS = frozenset({"sushi", "popcorn", "spaghetti", "butter", "salt", "bacon", "ice", "fondue", "oden",
                        "dango", "sake", "mate", "cooked rice", "curry rice", "wood", "fog", "green salad"})
_A_NOT_AN = ("uni", "use", "one", "ewe", "eu")  # vowel letter, consonant sound


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji of ``emoji-test.txt``: code points (with any VS16) and CLDR name."""

    codepoints: tuple[int, ...]
    group: str
    subgroup: str
    name: str


@dataclass(frozen=True)
class Glyphs:
    """The atlas: ``images [N, 64, 64, 4]`` uint8 straight RGBA (read-only) and per-glyph text.

    ``phrases[i]`` is how captions name glyph ``i`` ("a red apple", "an octopus", "grapes");
    ``held_out`` holds the names that only the test split may show; ``subsets`` maps a subset name
    to glyph names (``recommended_subset`` is the one for a tiny 32x32 model).
    """

    images: np.ndarray
    names: tuple[str, ...]
    phrases: tuple[str, ...]
    codepoints: tuple[str, ...]
    groups: tuple[str, ...]
    held_out: frozenset[str]
    subsets: Mapping[str, tuple[str, ...]]
    recommended_subset: str

    def index(self, name: str) -> int:
        """Atlas index of the glyph called ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"Unknown emoji name {name!r}; valid names are load_glyphs().names "
                             f"(e.g. {', '.join(self.names[:3])}).") from None


# -------------------------------------------------------------------- selection


def parse_emoji_test(text: str) -> list[EmojiEntry]:
    """The fully-qualified entries of an ``emoji-test.txt`` in file order."""
    entries, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            points, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() == "fully-qualified":
                name = re.sub(r"^\S+ E\d+\.\d+ ", "", comment.strip())  # "🍎 E0.6 red apple" -> "red apple"
                entries.append(EmojiEntry(tuple(int(p, 16) for p in points.split()), group, subgroup, name))
    return entries


def ascii_name(name: str) -> str | None:
    """``name`` with accents folded ("piñata" -> "pinata"); None unless it is then lowercase words."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return folded if re.fullmatch(r"[a-z][a-z -]*", folded) else None


def select_entries(entries: Sequence[EmojiEntry]) -> list[EmojiEntry]:
    """Single-code-point emoji of the kept groups with short ASCII names (module docstring), renamed to ASCII."""
    kept = []
    for entry in entries:
        subgroups = KEPT_GROUPS.get(entry.group, ())
        if sum(p != 0xFE0F for p in entry.codepoints) != 1 or entry.subgroup in DROPPED_SUBGROUPS:
            continue
        if subgroups is not None and entry.subgroup not in subgroups:
            continue
        name = ascii_name(entry.name)
        if name is not None and len(name.split()) <= MAX_NAME_WORDS:
            kept.append(EmojiEntry(entry.codepoints, entry.group, entry.subgroup, name))
    return kept


def caption_phrase(name: str) -> str:
    """The noun phrase captions use: "a red apple", "an octopus", "a unicorn"; plurals and mass nouns bare."""
    last = name.split()[-1]
    if name in MASS_NOUNS or (last.endswith("s") and not last.endswith(("ss", "us", "is", "os"))):
        return name
    article = "an" if name[0] in "aeiou" and not name.startswith(_A_NOT_AN) else "a"
    return f"{article} {name}"


def held_out_names(names: Sequence[str], protected: Sequence[str]) -> list[str]:
    """``round(HELD_OUT_EMOJI_FRACTION * len(names))`` names outside ``protected``, lowest sha256 first."""
    candidates = sorted((n for n in names if n not in set(protected)),
                        key=lambda n: hashlib.sha256(f"held-out/{n}".encode()).hexdigest())
    return sorted(candidates[: round(HELD_OUT_EMOJI_FRACTION * len(names))])


# ---------------------------------------------------------------------- render


def render_glyph(font, text: str, missing: np.ndarray | None = None) -> np.ndarray | None:
    """``text`` drawn with ``font`` -> ``[64, 64, 4]`` uint8 RGBA, or None when it draws nothing or ``missing``."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    if missing is not None and np.array_equal(np.asarray(canvas), missing):
        return None
    box = canvas.getbbox()  # alpha bounding box
    if box is None:
        return None
    cropped = canvas.crop(box)
    side = max(cropped.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(cropped, ((side - cropped.width) // 2, (side - cropped.height) // 2))
    glyph = np.array(square.resize((ATLAS_SIZE, ATLAS_SIZE), Image.Resampling.LANCZOS))
    glyph[glyph[..., 3] == 0] = 0
    return glyph


def _missing_glyph_image(font) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), MISSING_GLYPH_PROBE, font=font, embedded_color=True)
    return np.asarray(canvas)


# ----------------------------------------------------------------------- build


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _from_deb(work: Path, package: str, deb: Path | None, inner: Path) -> tuple[Path, dict]:
    """Extract ``inner`` from the package's ``.deb`` (``apt-get download`` into ``work`` when not given)."""
    if deb is None:
        _run(["apt-get", "download", package], cwd=work)
        deb = _find_deb(work, package)
        if deb is None:
            raise FileNotFoundError(f"`apt-get download {package}` left no {package}_*.deb in {work}.")
    deb = Path(deb).resolve()
    if not deb.is_file():
        raise FileNotFoundError(f"{package} .deb {deb} does not exist; pass an existing file or omit it to download.")
    root = work / package
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    if not (root / inner).is_file():
        raise FileNotFoundError(f"{deb.name} holds no {inner}; is it the {package} package?")
    return root / inner, {**_archive_record(deb, "debian", package), "member": str(inner),
                          "member_sha256": _sha256(root / inner)}


def _given_file(path: Path, argument: str) -> tuple[Path, dict]:
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {path} does not exist; pass the file, or leave {argument} out to "
                                "download the Debian package.")
    return path, {"file": path.name, "sha256": _sha256(path)}


def build(out_dir: Path = DEFAULT_EMOJI_DIR, *, deb: Path | None = None, font: Path | None = None,
          unicode_deb: Path | None = None, emoji_test: Path | None = None, overwrite: bool = False) -> dict:
    """Render the atlas into ``out_dir`` (atomically; see :mod:`jquant.atomic`); return the manifest.

    ``font``/``emoji_test`` are used as given; otherwise they are extracted from ``deb``/``unicode_deb``,
    downloaded with ``apt-get download`` when those are None too.
    """
    from PIL import ImageFont, __version__ as pillow_version

    if deb is not None and font is not None:
        raise ValueError("build: pass deb or font, not both.")
    if unicode_deb is not None and emoji_test is not None:
        raise ValueError("build: pass unicode_deb or emoji_test, not both.")
    check_output_folder(out_dir, overwrite=overwrite, argument="out_dir", overwrite_hint="--overwrite")
    with tempfile.TemporaryDirectory(prefix="jquant-emoji-") as tmp:
        work = Path(tmp)
        font_path, font_record = (_given_file(font, "font") if font is not None
                                  else _from_deb(work, FONT_PACKAGE, deb, FONT_IN_DEB))
        test_path, test_record = (_given_file(emoji_test, "emoji_test") if emoji_test is not None
                                  else _from_deb(work, UNICODE_PACKAGE, unicode_deb, EMOJI_TEST_IN_DEB))
        copyright_file = work / FONT_PACKAGE / COPYRIGHT_IN_DEB
        entries = select_entries(parse_emoji_test(test_path.read_text(encoding="utf-8")))
        pil_font = ImageFont.truetype(str(font_path), FONT_SIZE)
        missing = _missing_glyph_image(pil_font)
        images, kept, not_drawn = [], [], []
        for entry in entries:
            glyph = render_glyph(pil_font, "".join(map(chr, entry.codepoints)), missing)
            (not_drawn if glyph is None else kept).append(entry)
            if glyph is not None:
                images.append(glyph)
        names = [e.name for e in kept]
        absent = [n for n in REFERENCE_SUBSET if n not in names]
        if absent:
            raise ValueError(f"build: the reference subset names {absent} are not in the rendered atlas; "
                             "update REFERENCE_SUBSET for this font/emoji-test version.")
        atlas = _compressed_npy(np.stack(images))
        manifest = {
            "description": "Colour emoji glyph atlas: uint8 [N, 64, 64, 4] straight RGBA in an xz-compressed .npy; "
                           "glyph i is glyphs[i] below. Scenes: jquant.data.scenes.",
            "licence": {"font": "OFL-1.1", "emoji_images": "Apache-2.0", "names": "Unicode License (emoji-test.txt)",
                        "file": LICENSE_FILE if copyright_file.is_file() else None},
            "sources": {"font": font_record, "emoji_test": test_record},
            "render": {"pillow": pillow_version, "font_size": FONT_SIZE, "canvas": list(CANVAS),
                       "atlas_size": ATLAS_SIZE, "resample": "Lanczos, premultiplied alpha, from the cropped square"},
            "selection": {"kept_groups": {g: list(s) if s else "all" for g, s in KEPT_GROUPS.items()},
                          "dropped_subgroups": list(DROPPED_SUBGROUPS), "max_name_words": MAX_NAME_WORDS,
                          "single_codepoint_fully_qualified": True,
                          "not_drawn": [e.name for e in not_drawn]},
            "atlas": {"file": ATLAS_FILE, "shape": [len(images), ATLAS_SIZE, ATLAS_SIZE, 4], "dtype": "uint8",
                      "bytes": len(atlas), "sha256": hashlib.sha256(atlas).hexdigest()},
            "glyphs": [{"codepoint": " ".join(f"U+{p:04X}" for p in e.codepoints), "name": e.name,
                        "phrase": caption_phrase(e.name), "group": e.group, "subgroup": e.subgroup} for e in kept],
            "held_out_emoji": held_out_names(names, REFERENCE_SUBSET),
            "held_out_emoji_fraction": HELD_OUT_EMOJI_FRACTION,
            "subsets": {k: list(v) for k, v in SUBSETS.items()},
            "recommended_subset": RECOMMENDED_SUBSET,
        }
        with atomic_folder(out_dir, overwrite=overwrite, argument="out_dir", overwrite_hint="--overwrite") as folder:
            (folder / ATLAS_FILE).write_bytes(atlas)
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
            (folder / "README.md").write_text(_readme(manifest))
            if copyright_file.is_file():
                shutil.copyfile(copyright_file, folder / LICENSE_FILE)
    return manifest


def _compressed_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return lzma.compress(buffer.getvalue(), preset=9)


def _readme(manifest: dict) -> str:
    sources = manifest["sources"]
    versions = ", ".join(f"Debian `{s['package']}=={s['version']}` (sha256 `{s['sha256'][:16]}`)" if "package" in s
                         else f"`{s['file']}` (sha256 `{s['sha256'][:16]}`)" for s in sources.values())
    groups: dict[str, int] = {}
    for glyph in manifest["glyphs"]:
        groups[glyph["group"]] = groups.get(glyph["group"], 0) + 1
    atlas, licence_file = manifest["atlas"], manifest["licence"]["file"]
    return (
        "# jquant bundled emoji atlas\n\n"
        f"{atlas['shape'][0]} colour emoji from Noto Color Emoji, rendered at {atlas['shape'][1]}x{atlas['shape'][2]} "
        f"RGBA\n(`{atlas['file']}`, {atlas['bytes']:,} bytes, an xz-compressed `.npy`).\nSources: {versions}.\n\n"
        "## Licence\n\n"
        "The emoji images are Noto Emoji artwork, Apache License 2.0\n"
        "(https://www.apache.org/licenses/LICENSE-2.0); the font NotoColorEmoji.ttf they were rendered from\n"
        "is under the SIL Open Font License 1.1 (https://openfontlicense.org). Copyright 2013-2017 Google Inc.\n"
        + (f"`{licence_file}` is the Debian package's copyright file, with the full OFL text.\n" if licence_file else
           "(Built from a font file given directly, so the package's copyright file is not included.)\n")
        + "Names and groups come from Unicode's `emoji-test.txt` (Copyright Unicode, Inc., Unicode License).\n\n"
        "## Regenerate\n\n"
        "```\npython -m jquant.data.emoji build --out jquant/assets/emoji --overwrite\n```\n\n"
        "(`apt-get download` fetches both packages; `--deb`/`--font` and `--unicode-deb`/`--emoji-test` use local\n"
        "copies.) The same inputs and Pillow version give the same bytes.\n\n"
        "## Contents\n\n| group | glyphs |\n|---|---|\n"
        + "".join(f"| {g} | {n} |\n" for g, n in groups.items())
        + f"\nHeld out (test split only): {len(manifest['held_out_emoji'])} emoji, listed in `manifest.json`.\n"
        f"Recommended subset for a tiny 32x32 model: `{manifest['recommended_subset']}`: "
        + ", ".join(manifest["subsets"][manifest["recommended_subset"]]) + ".\n"
    )


# ------------------------------------------------------------------------ load


def load_glyphs(emoji_dir: Path | str | None = None) -> Glyphs:
    """The atlas in ``emoji_dir`` (default: the bundled ``jquant/assets/emoji``), checked against its manifest.

    Cached per folder and modification time.
    """
    emoji_dir = Path(emoji_dir or DEFAULT_EMOJI_DIR).resolve()
    manifest_path = emoji_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"No emoji atlas in {emoji_dir} (manifest.json missing). Build it with "
                                f"`python -m jquant.data.emoji build --out {emoji_dir}`.")
    return _load(emoji_dir, manifest_path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(emoji_dir: Path, mtime_ns: int) -> Glyphs:  # mtime_ns: cache key only
    manifest = json.loads((emoji_dir / "manifest.json").read_text(encoding="utf-8"))
    data = (emoji_dir / manifest["atlas"]["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["atlas"]["sha256"]:
        raise ValueError(f"{emoji_dir / manifest['atlas']['file']} does not match the sha256 in its manifest; "
                         f"rebuild with `python -m jquant.data.emoji build --out {emoji_dir} --overwrite`.")
    images = np.load(io.BytesIO(lzma.decompress(data)), allow_pickle=False)
    if list(images.shape) != manifest["atlas"]["shape"] or images.dtype != np.uint8:
        raise ValueError(f"{emoji_dir}: atlas is {images.dtype} {images.shape}, manifest says "
                         f"{manifest['atlas']['dtype']} {manifest['atlas']['shape']}.")
    images.setflags(write=False)
    glyphs = manifest["glyphs"]
    return Glyphs(images=images, names=tuple(g["name"] for g in glyphs), phrases=tuple(g["phrase"] for g in glyphs),
                  codepoints=tuple(g["codepoint"] for g in glyphs), groups=tuple(g["group"] for g in glyphs),
                  held_out=frozenset(manifest["held_out_emoji"]),
                  subsets={k: tuple(v) for k, v in manifest["subsets"].items()},
                  recommended_subset=manifest["recommended_subset"])


# ------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jquant.data.emoji", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="render the glyph atlas from the Debian packages")
    fonts = build_cmd.add_mutually_exclusive_group()
    fonts.add_argument("--deb", type=Path, help=f"a {FONT_PACKAGE}_*.deb (default: apt-get download)")
    fonts.add_argument("--font", type=Path, help="NotoColorEmoji.ttf itself")
    names = build_cmd.add_mutually_exclusive_group()
    names.add_argument("--unicode-deb", type=Path, help=f"a {UNICODE_PACKAGE}_*.deb (default: apt-get download)")
    names.add_argument("--emoji-test", type=Path, help="emoji-test.txt itself")
    build_cmd.add_argument("--out", type=Path, default=DEFAULT_EMOJI_DIR, help="output folder")
    build_cmd.add_argument("--overwrite", action="store_true", help="replace a folder this command wrote")
    args = parser.parse_args(argv)
    try:
        _command(args)
    except (OSError, RuntimeError, ValueError) as err:  # bad paths, refused output folders, failed downloads
        parser.exit(1, f"error: {err}\n")


def _command(args: argparse.Namespace) -> None:
    manifest = build(args.out, deb=args.deb, font=args.font, unicode_deb=args.unicode_deb,
                     emoji_test=args.emoji_test, overwrite=args.overwrite)
    atlas = manifest["atlas"]
    print(f"{atlas['shape'][0]} glyphs, {atlas['bytes']:,} bytes -> {args.out}")


if __name__ == "__main__":
    main()
