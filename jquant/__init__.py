"""jquant: make generative models cheap to run, in JAX.

Public API: ``jquant.ops`` (the compute boundary), ``jquant.generate`` and
``jquant.SamplingConfig``, ``jquant.sharding``; the subpackages ``jquant.models``
(model families, bundled reference models), ``jquant.data`` (offline corpus,
tokenizer), ``jquant.eval`` (perplexity, zero-shot, size, latency), ``jquant.kv``
and ``jquant.train`` are imported on first attribute access (``jq.eval``).
"""

import importlib

from jquant import ops as ops
from jquant import sharding as sharding
from jquant.generate import SamplingConfig as SamplingConfig
from jquant.generate import generate as generate

__version__ = "0.1.0"
_LAZY_SUBPACKAGES = ("data", "eval", "kv", "models", "train")
__all__ = ["SamplingConfig", "generate", "ops", "sharding", *_LAZY_SUBPACKAGES]


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"jquant.{name}")
    raise AttributeError(f"module 'jquant' has no attribute {name!r}")
