"""RWKVQuant's per-site algorithm (Xu et al., ICML 2025, arXiv 2505.03803): activation-weighted codebooks.

§3.5: an element-wise weight (RWKV's ``time_maa_*`` mixes ``y = μ ⊙ δ``) gets codebooks fitted by
weighted k-means, each channel weighted by its activation importance (``mix_codebook``).
``mix_codebook_weight`` is the same behind the weight-algorithm signature: the ``"rwkvquant"``
algorithm of ``jquant.algorithms.weights`` runs it on codebook formats of vectors (GPTQ on integer
formats, GPTVQ on codebook formats of matrices). The proxy that chooses between scalar and vector
quantization is ``jquant.algorithms.rwkvquant_proxy``; the model-level driver that turns the choices
into a recipe and runs ``jquant.quantize`` is ``jquant.methods.rwkvquant``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jquant.calib.capture import InputStatistics
from jquant.formats import CodebookFormat, Format, QArray, codebook_quantize
from jquant.numerics.kmeans import kmeans

Importance = Literal["square", "mean_abs"]


# ----------------------------------------------------------------------------
# §3.5: activation-weighted codebooks for element-wise weights
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixConfig:
    """``importance``: the per-channel weight ``s_c``, ``"square"`` (``E[δ_c²]``, the paper) or
    ``"mean_abs"`` (``|E[δ_c]|``, the released code); ``clip``: with ``"square"``, the activations clipped at the
    99.9th percentile of ``|δ|`` of each calibration sequence before averaging (the paper, per the spec's
    write-up; ``InputStatistics.clipped_square``); ``kmeans_iters`` Lloyd iterations; ``seed``."""

    importance: Importance = "square"
    clip: bool = True
    kmeans_iters: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.importance not in ("square", "mean_abs"):
            raise ValueError(f"MixConfig.importance must be 'square' or 'mean_abs', got {self.importance!r}.")
        if not isinstance(self.clip, bool):
            raise ValueError(f"MixConfig.clip must be a bool, got {self.clip!r}.")
        for name in ("kmeans_iters", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MixConfig.{name} must be an int >= 0, got {value!r}.")


def channel_importance(stats: InputStatistics, importance: Importance = "square", clip: bool = True) -> np.ndarray:
    """``s [C]`` from the site's input statistics: ``E[min(δ², τ²)]`` (``clipped_square / N``, ``clip``),
    ``diag(XᵀX) / N`` (``E[δ²]``) or ``|Σ x| / N``."""
    if importance == "mean_abs":
        return np.abs(stats.mean)
    if not clip:
        return np.diag(stats.hessian) / stats.count
    if stats.clipped_square is None:
        raise ValueError("clipped importance needs the site's clipped second moments (record_input(..., "
                         "clip_percentile=...)); this site records none: pass clip=False.")
    return stats.clipped_square / stats.count


def mix_codebook(weight: jax.Array, fmt: CodebookFormat, importance: np.ndarray, *,
                 config: MixConfig | None = None) -> QArray:
    """Codebooks for a vector ``μ [C]`` minimising ``Σ_c s_c (μ_c − μ̂_c)²`` (RWKVQuant §3.5).

    ``μ`` is cut into groups of ``fmt.codebook_rows`` channels (all ``C`` when None), each with its
    own ``2^k``-entry codebook of ``d``-vectors. Per group: weighted k-means
    (``jquant.numerics.kmeans``) with weights ``s`` (``importance [C]``): the centroid update is
    ``c_k = Σ_{c∈k} s_c μ_c / Σ_{c∈k} s_c``; each channel then takes its nearest codeword
    (``codebook_quantize``; for ``d = 1`` the weighted and unweighted assignments agree).
    """
    config = config or MixConfig()
    w = np.asarray(weight, np.float64)
    s = np.asarray(importance, np.float64)
    if w.ndim != 1 or s.shape != w.shape:
        raise ValueError(f"mix_codebook needs a vector weight [C] and importance [C], got {w.shape} and {s.shape}.")
    fmt.check_shape(w.shape, 0)
    d, K = fmt.vector_dim, fmt.codebook_size
    rows = fmt.codebook_rows or w.size
    books = []
    for g in range(w.size // rows):
        pts = w[g * rows:(g + 1) * rows].reshape(-1, d)
        wts = s[g * rows:(g + 1) * rows].reshape(-1, d)
        k = min(K, len(pts))  # fewer vectors than codewords: each vector is a codeword, the rest repeat the last
        c = kmeans(pts, k, weights=wts, seed=config.seed + g, iters=config.kmeans_iters).centroids
        books.append(np.concatenate([c, np.repeat(c[-1:], K - k, 0)]))
    codebooks = jnp.asarray(np.stack(books)[:, None], jnp.float32)  # grid (C/rows,) + (M=1, K, d)
    q = codebook_quantize(jnp.asarray(weight, jnp.float32), codebooks, fmt, axis=0)
    return dataclasses.replace(q, dtype=jnp.dtype(weight.dtype).name)


def mix_codebook_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                        options: Mapping[str, Any] = ()) -> QArray:
    """``mix_codebook`` behind the weight-algorithm signature; options: ``MixConfig`` fields."""
    if not isinstance(fmt, CodebookFormat) or fmt.num_codebooks != 1 or fmt.group_size is not None:
        raise ValueError(f"element-wise codebooks need a codebook format with one codebook per group and no scales "
                         f"such as 'vq-d1-k3-cb64xall', got {fmt.name}.")
    if axis != 0 or jnp.ndim(weight) != 1:
        raise ValueError(f"element-wise codebooks quantize vectors [C] along axis 0, got shape {jnp.shape(weight)}, "
                         f"axis {axis}.")
    if stats is None:
        raise ValueError("element-wise codebooks need calibration statistics of the site's inputs; pass calibration data.")
    options = dict(options)
    allowed = [f.name for f in dataclasses.fields(MixConfig)]
    if unknown := sorted(set(options) - set(allowed)):
        raise ValueError(f"unknown element-wise codebook options {unknown}; allowed: {allowed}.")
    config = MixConfig(**options)
    return mix_codebook(weight, fmt, channel_importance(stats, config.importance, config.clip), config=config)
