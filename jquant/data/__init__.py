"""Offline corpus, tokenizer and token windows.

* :mod:`jquant.data.corpus`: fetch/build the Shakespeare + Milton + KJV corpus,
  :func:`load_split`.
* :mod:`jquant.data.tokenizer`: the bundled byte-level BPE, :func:`load_tokenizer`.
* :mod:`jquant.data.windows`: token stream and fixed-length windows.
"""

from jquant.data.corpus import SOURCES, SPLITS, MissingSourceError, load_split
from jquant.data.tokenizer import BOS, EOS, PAD, load_tokenizer
from jquant.data.windows import batches, random_windows, token_stream, token_windows

__all__ = [
    "BOS", "EOS", "PAD", "SOURCES", "SPLITS", "MissingSourceError", "batches", "load_split",
    "load_tokenizer", "random_windows", "token_stream", "token_windows",
]
