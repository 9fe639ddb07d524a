"""Outlier statistics of a model's activations: what the outlier-targeting methods need to be present.

Two views, both from the existing calibration machinery (``jquant.calib.sequential.walk_blocks``: each block's
input state and the ``jquant.calib.capture`` statistics of every site in it):

**Site inputs** (from ``InputStatistics``: per-channel ``absmax a_c`` and second moment ``σ_c² = H_cc / n``,
over the ``n`` tokens that reached the site; an expert stack's statistics pooled over its experts)::

    absmax_ratio     = max_c a_c / median_c a_c          channel imbalance of the range (SmoothQuant, OSTQuant)
    rms_ratio        = max_c σ_c / median_c σ_c          channel imbalance of the variance (MambaQuant)
    channel_kurtosis = 3 d Σ_c σ_c⁴ / (Σ_c σ_c²)²         the kurtosis a token's d entries would have if channel c
                                                         were zero-mean Gaussian with RMS σ_c (3 for equal
                                                         channels; d·3 when one channel holds all the energy)

**Hidden states** (the residual stream entering each block, and leaving the last one), over all entries of
``x [..., d]``, as in Sun et al. 2024 ("Massive activations in large language models")::

    kurtosis         = E[(x - μ)⁴] / E[(x - μ)²]²        Pearson kurtosis of the entries (3 for a Gaussian)
    top_over_median  = max |x| / median |x|              massive activations: ~10⁴ in LLaMA2-7B (Sun et al.)

with the token position and channel of the largest entry (massive activations sit on a few fixed channels and on
the first or delimiter tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from jquant.calib.capture import InputStatistics
from jquant.calib.sequential import BlockVisit, walk_blocks


@dataclasses.dataclass(frozen=True)
class SiteOutliers:
    """Channel statistics of one site's inputs (module docstring); ``top_channel``: argmax_c a_c; ``tokens``: tokens
    seen; ``group_tokens``: tokens per group (per expert of an expert stack), None for ungrouped statistics."""

    absmax_ratio: float
    rms_ratio: float
    channel_kurtosis: float
    top_channel: int
    tokens: float
    group_tokens: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class HiddenOutliers:
    """Entry statistics of one hidden state (module docstring); ``top_token`` / ``top_channel``: the position in
    the sequence (index along ``T``) and the channel of the largest ``|x|``."""

    kurtosis: float
    top: float
    median: float
    top_over_median: float
    top_channel: int
    top_token: int


@dataclasses.dataclass(frozen=True)
class OutlierReport:
    """``sites``: site path -> statistics; ``blocks``: (block path, statistics of its input hidden state) in order;
    ``output``: statistics of the last block's output."""

    sites: dict[str, SiteOutliers]
    blocks: list[tuple[str, HiddenOutliers]]
    output: HiddenOutliers | None


def site_outliers(stats: InputStatistics) -> SiteOutliers:
    """Channel statistics (module docstring) of one site's captured inputs ``stats`` (``absmax [in]``,
    ``hessian [in, in]``; grouped statistics, e.g. an expert stack's ``[E, ...]``, are pooled over groups)."""
    groups = None if stats.num_groups is None else tuple(float(c) for c in stats.count)
    stats = stats.pooled()
    if not stats.count:
        raise ValueError("site_outliers: the statistics count no tokens; run calibration data through the site.")
    absmax = np.asarray(stats.absmax, np.float64)
    var = np.clip(np.diag(np.asarray(stats.hessian, np.float64)) / stats.count, 0.0, None)
    rms = np.sqrt(var)
    d = absmax.shape[0]
    return SiteOutliers(absmax_ratio=_ratio(absmax.max(), np.median(absmax)),
                        rms_ratio=_ratio(rms.max(), np.median(rms)),
                        channel_kurtosis=float(3 * d * np.sum(var**2) / max(np.sum(var) ** 2, 1e-300)),
                        top_channel=int(np.argmax(absmax)), tokens=float(stats.count), group_tokens=groups)


def hidden_outliers(x: np.ndarray) -> HiddenOutliers:
    """Entry statistics (module docstring) of a hidden state ``x [..., T, d]`` (float64 on the host)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.size == 0:
        raise ValueError(f"hidden_outliers: x must be [..., T, d] with entries, got shape {x.shape}.")
    centred = x - x.mean()
    m2 = np.mean(centred**2)
    ax = np.abs(x)
    flat = int(np.argmax(ax))
    index = np.unravel_index(flat, x.shape)
    top, median = float(ax.max()), float(np.median(ax))
    return HiddenOutliers(kurtosis=float(np.mean(centred**4) / max(m2**2, 1e-300)), top=top, median=median,
                          top_over_median=_ratio(top, median), top_channel=int(index[-1]), top_token=int(index[-2]))


def _ratio(top: float, median: float) -> float:
    return float(top / median) if median > 0 else float("inf")


def _hidden(state) -> np.ndarray:
    """The residual-stream array of one block state ``(hidden, context)``: the hidden part, or its largest leaf
    when a family carries a tuple (all batches share the layout)."""
    hidden = state[0]
    leaves = jax.tree.leaves(hidden)
    return np.asarray(max(leaves, key=lambda a: a.size), np.float64)


def model_outliers(model: nnx.Module, calib, *, batch_size: int = 8) -> OutlierReport:
    """Outlier statistics of ``model`` on ``calib`` (model inputs with a leading sample axis, token ids ``[N, T]``
    for an LM): every site's input channel statistics and every block's input hidden state (module docstring).
    The model is walked block by block as calibration walks it and is not modified."""
    sites: dict[str, SiteOutliers] = {}
    blocks: list[tuple[str, HiddenOutliers]] = []

    def visit(v: BlockVisit) -> None:
        blocks.append((v.path, hidden_outliers(np.concatenate([_hidden(s) for s in v.inputs]))))
        for rel, stats in v.stats.items():
            if np.any(np.asarray(stats.count)):
                sites[f"{v.path}/{rel}"] = site_outliers(stats)

    final = walk_blocks(nnx.clone(model), calib, visit, batch_size=batch_size, progress=False)
    output = hidden_outliers(np.concatenate([_hidden(s) for s in final])) if final else None
    return OutlierReport(sites=sites, blocks=blocks, output=output)
