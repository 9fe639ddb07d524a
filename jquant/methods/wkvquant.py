"""WKVQuant (Yue et al., 2024) end to end: 4-bit weights and a 4-bit KV cache, with the weights' quantization report.

``wkvquant(model, calib_tokens, config) -> (qmodel, report)`` runs the block-by-block training of
``jquant.kv.wkvquant`` (past-only attention, learned KV smoothing, cross-block reconstruction with learnable
weight clipping; the module's docstring has the maths) and, when it stores quantized weights, attaches the
``jquant.quantization.QuantizationReport`` of their stored formats, so ``jquant.save`` / ``jquant.load``
rebuild the model like any quantized one. It lives above ``jquant.quantize`` for that report; the KV-cache
package below never imports the quantization module.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from jquant.formats import IntFormat, QArray
from jquant.kv.wkvquant import WKVQuantConfig, WKVQuantReport, train_blocks
from jquant.quantization import QuantizationReport
from jquant.recipes import Recipe, Rule
from jquant.sites import find_sites


def wkvquant(model: nnx.Module, calib_tokens: np.ndarray, config: WKVQuantConfig = WKVQuantConfig(), *,
             progress: bool = True) -> tuple[nnx.Module, WKVQuantReport]:
    """A copy of ``model`` with WKVQuant's W4 weights, smoothed KV4 cache and past-only attention, and the
    per-block training losses. ``config.weight_bits=None`` quantizes the KV cache only (no report needed)."""
    out, report = train_blocks(model, calib_tokens, config, progress=progress)
    if config.weight_bits is not None:
        out.quantization = weight_report(out, config, report.seconds)
    return out, report


def weight_report(model: nnx.Module, config: WKVQuantConfig, seconds: float) -> QuantizationReport:
    """The ``QuantizationReport`` of the stored weights, so ``jquant.save``/``load`` rebuild their formats.

    The recipe states the stored format of every block linear (``int{b}-g{g}-asym``); its
    algorithm field says ``rtn`` because WKVQuant's learned clipping is not a ``jquant.quantize``
    algorithm (re-run ``wkvquant`` to reproduce the weights; the description says so).
    """
    fmt = IntFormat(bits=config.weight_bits, symmetric=False, group_size=config.weight_group)
    quantized = [s.path for s in find_sites(model) if isinstance(s.weight.get_value(), QArray)]
    recipe = Recipe(
        name=f"wkvquant-w{config.weight_bits}",
        description=(f"WKVQuant weights: {fmt.name} with OmniQuant learned clipping trained on the cross-block "
                     "reconstruction loss (stored format only; jquant.methods.wkvquant produces the values)"),
        rules=tuple(Rule(pattern=re.escape(p), weight=fmt.name) for p in quantized))
    described = f"{fmt.name} (WKVQuant: learned clipping + CRR)"
    return QuantizationReport(recipe=recipe, sites=tuple((p, described) for p in quantized),
                              unquantized=tuple(s.path for s in find_sites(model) if s.path not in set(quantized)),
                              seconds=seconds)
