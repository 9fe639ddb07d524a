"""RWKVQuant's codebook branches with the paper code's codebook pieces (Xu et al., ICML 2025, §3.4-3.5).

The weight algorithm ``"rwkvquant-codebook"`` (registered here; ``jquant.methods.rwkvquant`` names it for the
codebook sites when any of ``CodebookOptions`` differs from jquant's plain GPTVQ / k-means):

- matrices ``W [in, out]`` (§3.4): GPTVQ (``jquant.algorithms.gptvq``: row groups in order, GPTQ-style error
  feedback, Hessian-diagonal-weighted k-means) with each row group's codebooks started by ``init``
  (``mahalanobis_init`` by default) and, when compression is on, compressed (``compress_codebooks``: rank-r
  SVD, int8 with one scale per row group) *before* the group's error-feedback sweep, so the weights are assigned
  to, and the error fed back from, the codewords actually stored. The M-step then tunes, with the assignments
  fixed, the codebooks (uncompressed: GPTVQ's Adam update) or, compressed, the factors ``A`` (per codebook) and
  ``V`` (per fitting step) with Adam on ``tr(ΔW H ΔWᵀ)`` (spec §3.4 step 4), then re-quantizes ``A`` to its bits
  and ``V`` to float16; the tuned codebooks are kept only if, as stored, they lower that error.
- element-wise vectors ``μ [C]`` (§3.5): activation-weighted k-means (``jquant.algorithms.rwkvquant``'s
  importance ``s_c``) from ``init``, then the same compression over the vector's codebooks (one step).

The ``QArray`` keeps the format's float16 codebooks, holding the float16 rounding of the decompressed
codebooks; ``stored_bits_per_weight`` counts the compressed arrays instead (codes + ``codebook_storage``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant.algorithms.gptq_core import damped_factor
from jquant.algorithms.gptvq import (
    GPTVQConfig,
    assignment_loss,
    finetune_codebooks,
    gptvq_supports,
    round_to_codebooks,
)
from jquant.algorithms.rwkvquant import MixConfig, channel_importance
from jquant.algorithms.vq_core import feedback_sweep
from jquant.algorithms.weights import (
    AlgorithmSpec,
    gptq_weight,
    register_algorithm,
    rwkvquant_supports,
)
from jquant.calib.capture import InputStatistics
from jquant.formats import CodebookFormat, Format, IntFormat, QArray, codebook_quantize
from jquant.formats.packing import pack_bits
from jquant.methods.rwkvquant_codebook import (
    KMEANS_INITS,
    CodebookCompression,
    KMeansInit,
    codebook_storage,
    compress_codebooks,
    fit_codebook,
    storage_bits,
)

ALGORITHM = "rwkvquant-codebook"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodebookOptions:
    """``init``: the k-means start (``"mahalanobis"``, the paper's code, or ``"kmeans++"``); ``svd_rank`` /
    ``codebook_bits``: ``CodebookCompression`` (None / None: float16 codebooks as fitted)."""

    init: KMeansInit = "mahalanobis"
    svd_rank: int | None = None
    codebook_bits: int | None = None

    def __post_init__(self):
        if self.init not in KMEANS_INITS:
            raise ValueError(f"CodebookOptions.init must be one of {KMEANS_INITS}, got {self.init!r}.")
        CodebookCompression(svd_rank=self.svd_rank, bits=self.codebook_bits)  # validates both

    @property
    def compression(self) -> CodebookCompression:
        return CodebookCompression(svd_rank=self.svd_rank, bits=self.codebook_bits)


def _compressed(books: np.ndarray, compression: CodebookCompression, dtype: str) -> np.ndarray:
    """``books [G, K, d]`` as the stored codebooks decode them (compressed, then rounded to ``dtype``)."""
    if not compression.active:
        return books
    return compress_codebooks(books, compression).decompress().astype(dtype).astype(np.float64)


def _factors(books: np.ndarray, compression: CodebookCompression) -> tuple[np.ndarray, np.ndarray]:
    """One fitting step's stored codebooks ``books [G, K, d]`` as float factors ``(A [G, r], V [r, K·d])`` with
    ``books = A V`` (``V`` the identity without SVD)."""
    _, k, d = books.shape
    c = compress_codebooks(books, compression)
    a = c.coeffs.astype(np.float64) * (1.0 if c.scale is None else float(c.scale[0]))
    v = np.eye(k * d) if c.basis is None else c.basis.astype(np.float64)
    return a, v


def _requantized(a: np.ndarray, v: np.ndarray, compression: CodebookCompression, k: int, d: int,
                 dtype: str) -> np.ndarray:
    """Codebooks ``[G, K, d]`` as stored after tuning: ``A`` back to symmetric ``bits`` integers with one scale (or
    float16), ``V`` to float16, decoded and rounded to ``dtype``."""
    if compression.bits is not None:
        qmax = 2 ** (compression.bits - 1) - 1
        top = np.abs(a).max()
        scale = float(np.float16(top / qmax if top > 0 else 1.0))
        a = np.clip(np.round(a / scale), -qmax, qmax) * scale
    else:
        a = a.astype(np.float16).astype(np.float64)
    if compression.svd_rank is not None:
        v = v.astype(np.float16).astype(np.float64)
    return (a @ v).reshape(len(a), k, d).astype(dtype).astype(np.float64)


@functools.partial(jax.jit, static_argnames=("steps", "cols", "d"))
def _adam_factors(w, h, a, v, idx, lr, *, steps: int, cols: int, d: int):
    """``steps`` Adam steps on the factors ``a [Gr, Gc, r]``, ``v [Gr, r, K·d]`` of the codebooks ``a v``."""
    gr, gc, _ = a.shape
    loss_of = assignment_loss(w, h, idx, row_groups=gr, cols=cols, d=d)

    def loss(p):
        return loss_of(jnp.einsum("gcr,grk->gck", *p).reshape(gr, gc, -1, d))

    opt = optax.adam(lr)

    def step(carry, _):
        p, state = carry
        upd, state = opt.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, upd), state), None

    (tuned, _), _ = jax.lax.scan(step, ((a, v), opt.init((a, v))), None, length=steps)
    return tuned


def finetune_compressed(w, h, books, idx, lr: float, *, steps: int, cols: int, d: int,
                        compression: CodebookCompression, dtype: str):
    """The M-step on compressed codebooks ``books [Gr, Gc, K, d]`` (as stored) with fixed ``idx [in/d, out]``: Adam
    on each fitting step's factors ``A [Gc, r]``, ``V [r, K·d]`` minimising ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, then
    ``_requantized``. Returns ``(books, loss before, loss after)``; the input books when tuning does not help."""
    gr, _, k, _ = books.shape
    parts = [_factors(np.asarray(b, np.float64), compression) for b in books]
    a, v = _adam_factors(w, h, jnp.asarray(np.stack([p[0] for p in parts]), jnp.float32),
                         jnp.asarray(np.stack([p[1] for p in parts]), jnp.float32), idx, lr, steps=steps, cols=cols,
                         d=d)
    a, v = np.asarray(a, np.float64), np.asarray(v, np.float64)
    stored = jnp.asarray(np.stack([_requantized(a[i], v[i], compression, k, d, dtype) for i in range(gr)]),
                         jnp.float32)
    loss_of = assignment_loss(w, h, idx, row_groups=gr, cols=cols, d=d)
    before, after = loss_of(books), loss_of(stored)
    return jnp.where(after < before, stored, books), before, jnp.minimum(before, after)


def _fit_row_group(rows: np.ndarray, weights: np.ndarray, fmt: CodebookFormat, cols: int, config: GPTVQConfig,
                   options: CodebookOptions, salt: int) -> np.ndarray:
    """Codebooks ``[out / cols, K, d]`` for rows ``[R, out]`` with per-row weights ``[R]`` (GPTVQ's grouping)."""
    d, K = fmt.vector_dim, fmt.codebook_size
    R, m = rows.shape
    books = []
    for g in range(m // cols):
        pts = rows[:, g * cols:(g + 1) * cols].reshape(R // d, d, cols).transpose(0, 2, 1).reshape(-1, d)
        wts = np.broadcast_to(weights.reshape(R // d, d)[:, None, :], (R // d, cols, d)).reshape(-1, d)
        if len(pts) <= K:  # fewer vectors than codewords: each vector is its own codeword
            books.append(np.concatenate([pts, np.repeat(pts[-1:], K - len(pts), 0)]))
            continue
        books.append(fit_codebook(pts, K, weights=wts, init=options.init, iters=config.kmeans_iters,
                                  seed=config.seed + salt * 1009 + g).centroids)
    return _compressed(np.stack(books), options.compression, fmt.codebook_dtype)


def rwkvquant_vq(weight: jax.Array, hessian: jax.Array, fmt: CodebookFormat, *, config: GPTVQConfig | None = None,
                 options: CodebookOptions | None = None) -> QArray:
    """RWKVQuant's VQ branch (§3.4) for ``weight [in, out]`` with input Hessian ``hessian [in, in]`` (module doc)."""
    config, options = config or GPTVQConfig(), options or CodebookOptions()
    if (reason := gptvq_supports(fmt)) is not None:
        raise ValueError(reason)
    if jnp.ndim(weight) != 2:
        raise ValueError(f"rwkvquant_vq quantizes [in, out] weights, got shape {jnp.shape(weight)}.")
    shape = tuple(weight.shape)
    fmt.check_shape(shape, 0)
    n, m = shape
    d = fmt.vector_dim
    rows_per, cols = fmt.codebook_rows or n, fmt.codebook_cols or m
    w, h = jnp.asarray(weight, jnp.float32), jnp.asarray(hessian, jnp.float32)
    if h.shape != (n, n):
        raise ValueError(f"rwkvquant_vq: Hessian shape {h.shape} does not match the weight's input size {n}.")
    _, w0, u, _ = damped_factor(h, w, config.damp, what="rwkvquant")
    diag = np.asarray(jnp.diag(h), np.float64)
    col_group = jnp.arange(m) // cols
    cur, books, idx = w0, [], []
    for r in range(n // rows_per):
        rows = np.asarray(cur[r * rows_per:(r + 1) * rows_per], np.float64)
        b = jnp.asarray(_fit_row_group(rows, diag[r * rows_per:(r + 1) * rows_per], fmt, cols, config, options, r),
                        jnp.float32)
        cur, _, i = feedback_sweep(cur, u, jnp.int32(r * rows_per), (b, col_group), round_block=round_to_codebooks, d=d,
                                   n_blocks=rows_per // d, n_idx=1)
        books.append(b)
        idx.append(i[..., 0])
    books, idx = jnp.stack(books), jnp.concatenate(idx)  # [Gr, Gc, K, d], [n/d, out]
    if config.finetune_steps:
        scale = jnp.sqrt(jnp.mean(w0 * w0))
        if options.compression.active:
            books, _, _ = finetune_compressed(w0, h, books, idx, config.finetune_lr * scale,
                                              steps=config.finetune_steps, cols=cols, d=d,
                                              compression=options.compression, dtype=fmt.codebook_dtype)
        else:
            books, _, _ = finetune_codebooks(w0, h, books, idx, config.finetune_lr * scale,
                                             steps=config.finetune_steps, cols=cols, d=d)
    codebooks = books[:, :, None].astype(jnp.dtype(fmt.codebook_dtype))  # grid (Gr, Gc) + (M=1, K, d)
    return QArray(codes=pack_bits(idx, fmt.index_bits, 0), codebooks=codebooks, format=fmt, shape=shape,
                  dtype=jnp.dtype(weight.dtype).name, axis=0).validate()


def mix_codebook_compressed(weight: jax.Array, fmt: CodebookFormat, importance: np.ndarray, *,
                            config: MixConfig | None = None, options: CodebookOptions | None = None) -> QArray:
    """Codebooks for ``μ [C]`` minimising ``Σ_c s_c (μ_c − μ̂_c)²`` (§3.5; ``importance`` = ``s [C]``) from
    ``options.init``, then compressed over all the vector's codebooks at once; channels take the nearest stored
    codeword."""
    config, options = config or MixConfig(), options or CodebookOptions()
    w, s = np.asarray(weight, np.float64), np.asarray(importance, np.float64)
    if w.ndim != 1 or s.shape != w.shape:
        raise ValueError(f"mix_codebook_compressed needs μ [C] and importance [C], got {w.shape} and {s.shape}.")
    fmt.check_shape(w.shape, 0)
    d, K = fmt.vector_dim, fmt.codebook_size
    rows = fmt.codebook_rows or w.size
    books = []
    for g in range(w.size // rows):
        pts, wts = w[g * rows:(g + 1) * rows].reshape(-1, d), s[g * rows:(g + 1) * rows].reshape(-1, d)
        k = min(K, len(pts))  # fewer vectors than codewords: the rest repeat the last
        c = fit_codebook(pts, k, weights=wts, init=options.init, iters=config.kmeans_iters, seed=config.seed + g)
        books.append(np.concatenate([c.centroids, np.repeat(c.centroids[-1:], K - k, 0)]))
    books = _compressed(np.stack(books), options.compression, fmt.codebook_dtype)
    q = codebook_quantize(jnp.asarray(weight, jnp.float32), jnp.asarray(books[:, None], jnp.float32), fmt, axis=0)
    return dataclasses.replace(q, dtype=jnp.dtype(weight.dtype).name)


def stored_bits_per_weight(q: QArray, options: CodebookOptions) -> float:
    """Bits per weight of ``q`` as RWKVQuant stores it: its arrays, the codebooks replaced by the compressed
    ones (``codebook_storage`` per fitting step: a row group of a matrix, the whole of a vector)."""
    if q.codebooks is None or not options.compression.active:
        return q.bits_per_element
    grid = q.codebooks.shape[:q.ndim]
    steps = grid[0] if q.ndim > 1 else 1
    groups = int(np.prod(grid)) // steps
    K, d = q.format.codebook_size, q.format.vector_dim
    books = steps * storage_bits(codebook_storage(groups, K, d, options.compression))
    others = sum(8 * a.nbytes for name, a in q.arrays().items() if name != "codebooks")
    return (others + books) / q.size


def _split(options: Mapping[str, Any], branch: type) -> tuple[Any, CodebookOptions]:
    options = dict(options)
    own = {f.name for f in dataclasses.fields(CodebookOptions)}
    allowed = own | {f.name for f in dataclasses.fields(branch)}
    if unknown := sorted(set(options) - allowed):
        raise ValueError(f"unknown {ALGORITHM} options {unknown}; allowed: {sorted(allowed)}.")
    return (branch(**{k: v for k, v in options.items() if k not in own}),
            CodebookOptions(**{k: v for k, v in options.items() if k in own}))


def rwkvquant_codebook_weight(weight: jax.Array, fmt: Format, *, axis: int, stats: InputStatistics | None,
                              options: Mapping[str, Any] = ()) -> QArray:
    """The ``"rwkvquant-codebook"`` weight algorithm: GPTQ (integer ``fmt``), ``rwkvquant_vq`` (codebook ``fmt``,
    matrix) or ``mix_codebook_compressed`` (codebook ``fmt``, vector); options: ``CodebookOptions`` fields plus
    the branch's (``GPTQConfig`` / ``GPTVQConfig`` / ``MixConfig``)."""
    if reason := rwkvquant_supports(fmt):
        raise ValueError(reason)
    if isinstance(fmt, IntFormat):
        return gptq_weight(weight, fmt, axis=axis, stats=stats, options=options)
    if axis != 0:
        raise ValueError(f"{ALGORITHM} quantizes codebook formats along axis 0, got axis {axis}.")
    if stats is None:
        raise ValueError(f"{ALGORITHM} needs calibration statistics of the site's inputs; pass calibration data.")
    if jnp.ndim(weight) == 1:
        config, own = _split(options, MixConfig)
        importance = channel_importance(stats, config.importance, config.clip)
        return mix_codebook_compressed(weight, fmt, importance, config=config, options=own)
    config, own = _split(options, GPTVQConfig)
    return rwkvquant_vq(weight, stats.hessian, fmt, config=config, options=own)


register_algorithm(AlgorithmSpec(ALGORITHM, rwkvquant_codebook_weight, rwkvquant_supports, needs_calibration=True))
