"""Offline corpus, tokenizer and token windows.

* :mod:`jquant.data.corpus`: fetch/build the Shakespeare + Milton + KJV corpus,
  :func:`load_split`.
* :mod:`jquant.data.tokenizer`: the bundled byte-level BPE, :func:`load_tokenizer`.
* :mod:`jquant.data.windows`: token stream and fixed-length windows.

Names are imported lazily (PEP 562), so ``python -m jquant.data.corpus`` and
``python -m jquant.data.tokenizer`` do not import their own module twice.
"""

import importlib
from typing import Any

_EXPORTS = {
    "SOURCES": "corpus", "SPLITS": "corpus", "MissingSourceError": "corpus", "load_split": "corpus",
    "BOS": "tokenizer", "EOS": "tokenizer", "PAD": "tokenizer", "load_tokenizer": "tokenizer",
    "batches": "windows", "random_windows": "windows", "token_stream": "windows",
    "token_windows": "windows",
    "load_glyphs": "emoji",
    "EmojiScenes": "scenes", "emoji_scenes": "scenes", "make_scene": "scenes",
    "VideoScenes": "video_scenes", "video_scenes": "video_scenes", "make_clip": "video_scenes",
    "ClipTruth": "motion", "Segment": "motion",
    "VQAScenes": "vqa_scenes", "vqa_scenes": "vqa_scenes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jquant.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jquant.data.{_EXPORTS[name]}"), name)
