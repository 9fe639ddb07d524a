"""GPTVQ-style vector quantization (van Baalen et al. 2024, "GPTVQ: The Blessing of Dimensionality").

For ``W [in, out]`` (vectors of ``d`` consecutive inputs of one output column) with a
``CodebookFormat`` whose codebooks cover ``codebook_rows × codebook_cols`` elements (GPTVQ's
groups), following the paper's Algorithm 1:

1. Row groups are processed in order. When a row group starts, each of its codebooks is
   initialised by weighted k-means (``jquant.numerics.kmeans``: k-means++ start, Lloyd) on the
   group's *current* weights (earlier groups' error feedback included), each coordinate weighted
   by the Hessian diagonal ``H_ii`` of its input (GPTVQ §3.2's importance weighting).
2. The group's rows are quantized ``d`` at a time with GPTQ-like error feedback
   (``jquant.algorithms.vq_core``); each vector takes the codeword with the least output error
   ``‖U_BB⁻ᵀ (w − c)‖²`` (the exact ``d × d`` metric; the paper uses its diagonal).
3. Codebook update (GPTVQ §3.3): with the assignments fixed, every codebook is tuned with Adam
   (optax) on the layer's output error ``tr((W − Ŵ)ᵀ H (W − Ŵ)) / tr(Wᵀ H W)``; the result is
   kept only if it lowers that error.

Not implemented from the paper: per-block scaling (the format's ``group_size`` scales) and SVD
codebook compression; the format must have ``num_codebooks == 1`` and no scales.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant.algorithms.gptq_core import damped_factor
from jquant.algorithms.vq_core import feedback_sweep
from jquant.formats import CodebookFormat, QArray
from jquant.formats.packing import pack_bits
from jquant.numerics.kmeans import kmeans


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTVQConfig:
    """``damp``: Hessian damping (fraction of the mean diagonal); ``kmeans_iters``/``seed``: the
    codebook initialisation; ``finetune_steps``/``finetune_lr``: the codebook update (0 steps = off;
    the rate is relative to the RMS of the weight)."""

    damp: float = 0.01
    kmeans_iters: int = 30
    seed: int = 0
    finetune_steps: int = 100
    finetune_lr: float = 1e-3

    def __post_init__(self):
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTVQConfig.damp must be in [0, 1), got {self.damp}.")
        for name in ("kmeans_iters", "finetune_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"GPTVQConfig.{name} must be >= 0, got {getattr(self, name)}.")


def gptvq_supports(fmt) -> str | None:
    """Why GPTVQ cannot use ``fmt`` (None if it can)."""
    if not isinstance(fmt, CodebookFormat):
        return f"gptvq needs a codebook format such as 'vq-d2-k4-cb256x16', got {fmt.name}."
    if fmt.num_codebooks != 1 or fmt.group_size is not None:
        return f"gptvq supports one codebook per group and no scales, got {fmt.name}."
    return None


def round_to_codebooks(rows: jax.Array, t: jax.Array, params) -> tuple[jax.Array, jax.Array]:
    """Nearest codeword under ``‖T (w − c)‖²``: rows ``[d, out]``, params ``(books [G, K, d], col_group [out])``."""
    books, col_group = params
    v = rows.T @ t.T  # [out, d]: T w per column
    tb = books @ t.T  # [G, K, d]: T c per codeword
    dist = jnp.sum(tb * tb, -1)[col_group] - 2 * jnp.einsum("od,okd->ok", v, tb[col_group])
    idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    return books[col_group, idx].T, idx[:, None]


def _init_codebooks(rows: np.ndarray, weights: np.ndarray, fmt: CodebookFormat, cols: int, config: GPTVQConfig,
                    salt: int) -> np.ndarray:
    """k-means codebooks ``[n_col_groups, K, d]`` for rows ``[R, out]`` with per-row weights ``[R]``."""
    d, K = fmt.vector_dim, fmt.codebook_size
    R, m = rows.shape
    books = []
    for g in range(m // cols):
        block = rows[:, g * cols:(g + 1) * cols]
        pts = block.reshape(R // d, d, cols).transpose(0, 2, 1).reshape(-1, d)
        wts = np.broadcast_to(weights.reshape(R // d, d)[:, None, :], (R // d, cols, d)).reshape(-1, d)
        if len(pts) <= K:  # fewer vectors than codewords: each vector is its own codeword
            books.append(np.concatenate([pts, np.repeat(pts[-1:], K - len(pts), 0)]))
            continue
        books.append(kmeans(pts, K, weights=wts, seed=config.seed + salt * 1009 + g, iters=config.kmeans_iters).centroids)
    return np.stack(books)


def assignment_loss(w, h, idx, *, row_groups: int, cols: int, d: int):
    """``books [Gr, Gc, K, d] -> tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` for ``w [in, out]`` decoded through fixed
    ``idx [in/d, out]`` (row group ``Gr`` of ``row_groups``, column group of ``cols`` columns): the M-step's loss."""
    n, m = w.shape
    col_group = jnp.arange(m) // cols
    row_group = jnp.arange(n // d) // (n // d // row_groups)
    norm = jnp.trace(w.T @ h @ w)

    def loss(b):
        vec = b[row_group[:, None], col_group[None, :], idx]  # [n/d, out, d]
        e = w - jnp.swapaxes(vec, 1, 2).reshape(n, m)
        return jnp.sum(e * (h @ e)) / norm

    return loss


@functools.partial(jax.jit, static_argnames=("steps", "cols", "d"))
def finetune_codebooks(w, h, books, idx, lr, *, steps: int, cols: int, d: int):
    """Adam on the codebooks ``[Gr, Gc, K, d]`` with fixed ``idx [in/d, out]``; returns (books, loss before, after)."""
    loss = assignment_loss(w, h, idx, row_groups=books.shape[0], cols=cols, d=d)
    opt = optax.adam(lr)

    def step(carry, _):
        b, state = carry
        g = jax.grad(loss)(b)
        upd, state = opt.update(g, state, b)
        return (optax.apply_updates(b, upd), state), None

    (tuned, _), _ = jax.lax.scan(step, (books, opt.init(books)), None, length=steps)
    before, after = loss(books), loss(tuned)
    return jnp.where(after < before, tuned, books), before, jnp.minimum(before, after)


def gptvq_quantize(weight: jax.Array, hessian: jax.Array, fmt: CodebookFormat, *, axis: int = 0,
                   config: GPTVQConfig = GPTVQConfig()) -> QArray:
    """GPTVQ codes and codebooks for ``weight [in, out]`` with input Hessian ``hessian [in, in]``."""
    if (reason := gptvq_supports(fmt)) is not None:
        raise ValueError(reason)
    if axis != 0 or jnp.ndim(weight) != 2:
        raise ValueError(f"gptvq handles [in, out] weights along axis 0, got shape {jnp.shape(weight)}, axis {axis}.")
    shape = tuple(weight.shape)
    fmt.check_shape(shape, 0)
    n, m = shape
    d = fmt.vector_dim
    rows_per = fmt.codebook_rows or n
    cols = fmt.codebook_cols or m
    w = jnp.asarray(weight, jnp.float32)
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (n, n):
        raise ValueError(f"gptvq: Hessian shape {h.shape} does not match the weight's input size {n}.")
    _, w0, u, _ = damped_factor(h, w, config.damp, what="gptvq")
    diag = np.asarray(jnp.diag(h), np.float64)
    col_group = jnp.arange(m) // cols
    cur, books, idx = w0, [], []
    for r in range(n // rows_per):
        rows = np.asarray(cur[r * rows_per:(r + 1) * rows_per], np.float64)
        b = _init_codebooks(rows, diag[r * rows_per:(r + 1) * rows_per], fmt, cols, config, r)
        b = jnp.asarray(b, jnp.float32)
        cur, _, i = feedback_sweep(cur, u, jnp.int32(r * rows_per), (b, col_group), round_block=round_to_codebooks, d=d,
                                   n_blocks=rows_per // d, n_idx=1)
        books.append(b)
        idx.append(i[..., 0])
    books, idx = jnp.stack(books), jnp.concatenate(idx)  # [Gr, Gc, K, d], [n/d, out]
    if config.finetune_steps:
        scale = jnp.sqrt(jnp.mean(w0 * w0))
        books, _, _ = finetune_codebooks(w0, h, books, idx, config.finetune_lr * scale, steps=config.finetune_steps,
                                cols=cols, d=d)
    codebooks = books[:, :, None].astype(jnp.dtype(fmt.codebook_dtype))  # grid (Gr, Gc) + (M=1, K, d)
    q = QArray(codes=pack_bits(idx, fmt.index_bits, 0), codebooks=codebooks, format=fmt, shape=shape,
               dtype=jnp.dtype(weight.dtype).name, axis=0)
    return q.validate()
