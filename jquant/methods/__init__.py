"""Whole-model quantization methods that sit above ``jquant.quantize``: they decide a recipe per model or
attach the quantization report, so they import ``jquant.quantization``, which nothing below may import.

- ``rwkvquant``: RWKVQuant's proxy-guided SQ/VQ choice per site -> a concrete recipe -> ``quantize``
  (the per-site maths: ``jquant.algorithms.rwkvquant`` and ``rwkvquant_proxy``);
- ``wkvquant``: WKVQuant's block-by-block training (``jquant.kv.wkvquant``) plus the weights'
  ``QuantizationReport``.
"""
