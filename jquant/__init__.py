"""jquant: make generative models cheap to run, in JAX.

Public API: ``jquant.ops`` (the compute boundary), ``jquant.models`` (model
families and bundled reference models), ``jquant.data`` (offline corpus and
tokenizer), ``jquant.eval`` (perplexity, zero-shot, size, latency),
``jquant.generate``, ``jquant.sharding``, ``jquant.train``.
"""

from jquant import ops as ops
from jquant import sharding as sharding
from jquant.generate import SamplingConfig as SamplingConfig
from jquant.generate import generate as generate

__version__ = "0.1.0"
__all__ = ["SamplingConfig", "generate", "ops", "sharding"]
