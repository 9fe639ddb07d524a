"""MQuant (Yu et al., ACM MM 2025, *MQuant: Unleashing the Inference Potential of Multimodal Large Language Models
via Full Static Quantization*): the pieces that are not plain recipe rules.

- MSQ (§3.2): per-modality static activation scales are the recipes ``mquant-w4a8`` / ``mquant-w4a8-vit4``
  (``jquant.recipes.builtin``; a Qwen2-VL decoder linear receives each token's modality as its group id).
  ``quarot-w4a8-static-vl`` is the *single shared static scale* baseline (``Rule(static_activation="shared")``).
- AIFS (§3.3): ``Qwen2VL.prefill(..., aifs=True)`` with :func:`aifs_permutation` (re-exported here).
- RMS (§3.4, Eq. 6-9): after an online deterministic Hadamard ``x' = x H`` and ``W' = Hᵀ W`` (jquant's ``[in, out]``
  kernels), row 0 of ``W'`` is ``√d · mean_j W[j, :]`` and dominates every per-output-channel scale when the
  weights have a same-sign mean. :func:`split_channel` separates it into a rank-1 float side branch
  ``y = x'_{:,1:} W'_{1:} + x'_{:,0} W'_{0}``; :func:`needs_split` is the selection criterion of spec §7.1. In a
  model it is the transform step ``rms_split`` (``jquant.transforms.channel_split``, run by the ``mquant-*``
  recipes after QuaRot): each selected linear carries a ``ChannelSplit`` (``split_report`` lists them);
  :func:`rms_apply` is the plain-array reference.
"""

from __future__ import annotations

from jquant.models.qwen2_vl_model import aifs_permutation, permute_rows
from jquant.transforms.channel_split import needs_split, rms_split, split_channel, split_report

__all__ = ["aifs_permutation", "needs_split", "permute_rows", "rms_apply", "rms_split", "split_channel", "split_report"]


def rms_apply(x, main, side, quantized_main=None):
    """The reference of a split linear, ``x [.., in] -> [.., out]``: ``x main + x[.., 0:1] side``
    (``quantized_main`` replaces ``main`` in the GEMM)."""
    weight = main if quantized_main is None else quantized_main
    return x @ weight + x[..., :1] * side
