"""Head-wise arrow attention (DiTFastAttnV2 §3.1, §6): a flash-attention forward that skips KV tiles.

Joint text + image self-attention ``q, k, v [B, S, H|K, D]`` (``K`` key/value heads, ``H % K == 0``) with
the text at positions ``T = [text_start, text_start + n_text)`` (SD3: text last, ``text_start = n_image``;
Flux: text first, ``text_start = 0``) and one window per head, ``windows [H] int32``:

- ``-1``: dense attention;
- ``0``: the head is skipped; its output is zeros (the caller substitutes the cached output);
- ``w >= 1``: ``jquant.ops.mask.Arrow(n_text, w, text_start)``: query ``i`` may attend key ``j`` iff
  ``i ∈ T or j ∈ T or |i - j| <= w``.

``O = softmax(q k^T * scale + mask) v`` per head, computed FlashAttention-2 style (Dao 2023, Alg. 1): one
program per (query tile, batch, head) keeps the running row max ``m``, sum ``l`` and ``acc = sum_j p_ij v_j``
(float32) over the KV tiles it visits, rescaling by ``exp(m_old - m_new)``; ``O = acc / l``.

Tile skipping: ``kv_tile_runs`` gives, per (query tile, head), at most three contiguous runs of KV tiles: all
tiles for a dense head or a query tile that touches the text; otherwise the band tiles
``[max(qa - w, 0) // bk, min(qb + w, S - 1) // bk]`` plus the text tiles below and above the band. One
``fori_loop`` walks exactly those tiles (its trip count is data: the window table is an input, so every
plan shares one compiled program); the other tiles are never loaded. The element mask (band, text, padded keys)
is applied only on tiles some pair of which is not allowed (a ``lax.cond`` around one select of the scores);
interior tiles skip it. ``arrow_tile_count`` counts the visited tiles with the same function (for expected savings).

Written for the Pallas Triton GPU backend like the other kernels (``pallas_kernels/_common.py``); the window
table is read as a scalar from a squeezed ``BlockSpec`` (the GPU-portable form of TPU scalar prefetch), and
``interpret=True`` runs it on any backend. On a GPU float32 inputs take TF32 dots (Triton's default).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jquant.ops.kernel import Kernel
from jquant.ops.mask import Arrow, Band, Full
from ._common import interpret_mode, is_power_of_two

NAME = "pallas-arrow-attention"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: no inf - inf on fully masked rows


@dataclasses.dataclass(frozen=True)
class ArrowConfig:
    """Tile sizes (powers of two >= 16) and Triton launch parameters."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def kv_tile_runs(qa, qb, w, *, n_text: int, text_start: int, seq_len: int, block_k: int):
    """The KV tiles a query tile must visit, as three runs ``((start, count), ...)`` of int32.

    ``qa, qb``: first and last real query position of the tile (``qb <= seq_len - 1``); ``w``: the head's
    window (``-1``, ``0`` or ``>= 1``, at most ``seq_len``). Scalars in the kernel, broadcast arrays in
    ``arrow_tile_count``. The runs are disjoint; their union is every tile holding an allowed pair.
    """
    qa, qb, w = (jnp.asarray(x, jnp.int32) for x in (qa, qb, w))
    n_tiles = -(-seq_len // block_k)
    zero = jnp.zeros_like(qa + qb + w)
    if n_text > 0:
        t_lo, t_hi = text_start // block_k, (text_start + n_text - 1) // block_k
        q_text = (qa < text_start + n_text) & (qb >= text_start)
    else:
        t_lo, t_hi = 0, -1
        q_text = zero > 0
    dense = (w < 0) | q_text
    live = (w != 0).astype(jnp.int32)
    band_lo = lax.div(jnp.maximum(qa - w, 0), block_k)  # operands >= 0: truncation is the floor
    band_hi = lax.div(jnp.minimum(qb + w, seq_len - 1), block_k)
    below = jnp.minimum(band_lo - 1, t_hi) - t_lo + 1  # text tiles left of the band
    above_start = jnp.maximum(band_hi + 1, t_lo)
    above = t_hi - above_start + 1  # text tiles right of the band
    runs = ((jnp.where(dense, 0, band_lo), jnp.where(dense, n_tiles, band_hi - band_lo + 1)),
            (zero + t_lo, jnp.where(dense, 0, jnp.maximum(below, 0))),
            (above_start, jnp.where(dense, 0, jnp.maximum(above, 0))))
    return tuple((start, count * live) for start, count in runs)


def _kernel(w_ref, q_ref, k_ref, v_ref, o_ref, *, n_text: int, text_start: int, seq_len: int, scale: float,
            cfg: ArrowConfig):
    bq, bk = cfg.block_q, cfg.block_k
    w = w_ref[()]
    qa = pl.program_id(0) * bq
    qb = jnp.minimum(qa + bq, seq_len) - 1
    runs = kv_tile_runs(qa, qb, w, n_text=n_text, text_start=text_start, seq_len=seq_len, block_k=bk)
    (s1, n1), (s2, n2), (s3, n3) = runs
    text_end = text_start + n_text
    q_all_text = (n_text > 0) & (qa >= text_start) & (qb < text_end)
    q = q_ref[...]
    rows = qa + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    is_text_row = (rows >= text_start) & (rows < text_end)

    def mask(s, k0):
        cols = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        allowed = ((w < 0) | is_text_row | ((cols >= text_start) & (cols < text_end))
                   | ((cols - rows <= w) & (rows - cols <= w))) & (cols < seq_len)
        return jnp.where(allowed, s, MASK_VALUE)

    def body(idx, carry):
        acc, m, l = carry
        kt = jnp.where(idx < n1, s1 + idx, jnp.where(idx < n1 + n2, s2 + idx - n1, s3 + idx - n1 - n2))
        ka = kt * bk
        kb = ka + bk - 1
        k = k_ref[pl.ds(ka, bk), :]
        v = v_ref[pl.ds(ka, bk), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        interior = (kb < seq_len) & ((w < 0) | q_all_text | ((ka >= text_start) & (kb < text_end))
                                     | ((ka >= qb - w) & (kb <= qa + w)))
        s = lax.cond(interior, lambda s: s, functools.partial(mask, k0=ka), s)  # element mask: boundary tiles only
        # A masked score weighs exp(MASK_VALUE - m) = 0 once the row has met an allowed key; a real row's first
        # allowed key rescales whatever came before by alpha = exp(MASK_VALUE - m_new) = 0.
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    d = q.shape[-1]
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, _, l = lax.fori_loop(0, n1 + n2 + n3, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)  # no tile visited (w = 0): zeros


def _pad_seq(x: jax.Array, multiple: int) -> jax.Array:
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


@functools.partial(jax.jit, static_argnames=("n_text", "text_start", "scale", "cfg", "interpret"))
def _call(q, k, v, windows, *, n_text: int, text_start: int, scale: float, cfg: ArrowConfig, interpret: bool):
    b, s, h, d = q.shape
    groups = h // k.shape[2]
    windows = jnp.minimum(windows.astype(jnp.int32), s)  # w >= S is dense; keeps qb + w in int32
    qp, kp, vp = _pad_seq(q, cfg.block_q), _pad_seq(k, cfg.block_k), _pad_seq(v, cfg.block_k)
    kernel = functools.partial(_kernel, n_text=n_text, text_start=text_start, seq_len=s, scale=scale, cfg=cfg)
    kv_spec = pl.BlockSpec((None, kp.shape[1], None, d), lambda i, bi, hi: (bi, 0, lax.div(hi, groups), 0))
    out = pl.pallas_call(
        kernel,
        grid=(qp.shape[1] // cfg.block_q, b, h),
        in_specs=[pl.BlockSpec((None,), lambda i, bi, hi: (hi,)),
                  pl.BlockSpec((None, cfg.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                  kv_spec, kv_spec],
        out_specs=pl.BlockSpec((None, cfg.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="arrow_attention",
    )(windows, qp, kp, vp)
    return out[:, :s]


def _check_windows(windows, h: int) -> None:
    if jnp.ndim(windows) != 1 or jnp.shape(windows)[0] != h or not jnp.issubdtype(jnp.asarray(windows).dtype,
                                                                                  jnp.integer):
        raise ValueError(f"{NAME}: windows must be an integer [H] = [{h}] array (one window per head), got shape "
                         f"{jnp.shape(windows)} dtype {jnp.asarray(windows).dtype}.")
    try:
        values = np.asarray(windows)
    except jax.errors.TracerArrayConversionError:  # a traced plan: checked by whoever built it
        return
    if np.any(values < -1):
        raise ValueError(f"{NAME}: windows {values.tolist()} hold values below -1; use -1 (dense), 0 (skip the "
                         "head) or a half-width >= 1.")


def check(q: jax.Array, k: jax.Array, v: jax.Array, windows, *, n_text: int, text_start: int,
          cfg: ArrowConfig = ArrowConfig()) -> None:
    """Raises a ``ValueError``/``TypeError`` naming the argument when the call does not fit the kernel."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{NAME}: q must be [B, S, H, D] and k, v equal [B, S, K, D]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}.")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"{NAME}: k/v {k.shape} do not match q {q.shape} (self-attention: same B, S and D; H a "
                         "multiple of K).")
    if d not in HEAD_DIMS:
        raise ValueError(f"{NAME}: head dim D={d} is not one of {HEAD_DIMS}; use jquant.ops.attention instead.")
    if any(x.dtype not in DTYPES for x in (q, k, v)) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{NAME}: q, k, v must share one dtype of float32/bfloat16/float16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}.")
    for name in ("block_q", "block_k"):
        value = getattr(cfg, name)
        if not is_power_of_two(value) or value < 16:
            raise ValueError(f"{NAME}: {name}={value} must be a power of two >= 16.")
    if not (0 <= n_text <= s and 0 <= text_start <= s - n_text):
        raise ValueError(f"{NAME}: n_text={n_text} text tokens at text_start={text_start} do not fit a sequence of "
                         f"{s}; text first is text_start=0, text last text_start=S - n_text.")
    _check_windows(windows, h)


def arrow_attention(q: jax.Array, k: jax.Array, v: jax.Array, windows, *, n_text: int, text_start: int,
                    scale: float | None = None, config: ArrowConfig = ArrowConfig(),
                    interpret: bool | None = None) -> jax.Array:
    """Head-wise arrow attention ``[B, S, H, D]`` (module docstring); ``windows [H]`` may be traced.

    ``scale`` defaults to ``D ** -0.5``; ``interpret`` to True off a GPU. Output in ``q.dtype``.
    """
    check(q, k, v, windows, n_text=n_text, text_start=text_start, cfg=config)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    interpret = interpret_mode() if interpret is None else interpret
    return _call(q, k, v, jnp.asarray(windows), n_text=n_text, text_start=text_start, scale=scale, cfg=config,
                 interpret=interpret)


def head_mask(window: int, seq_len: int, n_text: int, text_start: int) -> np.ndarray:
    """``[S, S]`` bool for one head, from ``jquant.ops.mask``: ``Full`` for -1, ``Arrow`` for w >= 1."""
    if window < 0:
        return Full().dense(seq_len, seq_len)
    return Arrow(n_text, int(window), text_start).dense(seq_len, seq_len)


def arrow_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, windows, n_text: int, text_start: int,
                              scale: float | None = None) -> jax.Array:
    """Dense masked softmax per head in float32 (HIGHEST precision); heads with window 0 are zeros.

    ``windows`` must be concrete (the masks are built with ``jquant.ops.mask``). Output in ``q.dtype``.
    """
    b, s, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    windows = np.asarray(windows)
    masks = np.stack([head_mask(w, s, n_text, text_start) if w != 0 else np.ones((s, s), bool) for w in windows])
    kv = jnp.repeat(k, h // k.shape[2], axis=2), jnp.repeat(v, h // v.shape[2], axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kv[0].astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * scale
    probs = jax.nn.softmax(jnp.where(masks[None], logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, kv[1].astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return jnp.where((windows == 0)[None, None, :, None], 0.0, out).astype(q.dtype)


def arrow_tile_count(windows, n_text: int, text_start: int, seq_len: int, block_q: int, block_k: int) -> np.ndarray:
    """``[H]`` int: the (query tile, KV tile) pairs the kernel visits per head (the same ``kv_tile_runs``)."""
    windows = np.minimum(np.asarray(windows, np.int64), seq_len)
    qa = np.arange(0, seq_len, block_q)[None, :]
    qb = np.minimum(qa + block_q, seq_len) - 1
    runs = kv_tile_runs(qa, qb, windows[:, None], n_text=n_text, text_start=text_start, seq_len=seq_len,
                        block_k=block_k)
    return np.asarray(sum(count for _, count in runs)).sum(axis=1)


def _accepts(q, k, mask) -> bool:
    from jquant.ops.dispatch import current_mode

    window = getattr(mask, "half_width", 0)
    return (isinstance(mask, (Arrow, Band)) and window >= 1 and q.ndim == 4 and q.shape[1] == k.shape[1]
            and q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES and q.dtype == k.dtype
            and (current_mode() == "pallas" or (current_mode() == "auto" and jax.default_backend() == "gpu")))


def _apply(q, k, v, mask, scale):
    n_text, text_start = (mask.n_text, mask.text_start) if isinstance(mask, Arrow) else (0, 0)
    windows = jnp.full((q.shape[2],), mask.half_width, jnp.int32)
    return arrow_attention(q, k, v, windows, n_text=n_text, text_start=text_start, scale=scale)


ATTENTION_KERNEL = Kernel(NAME, _accepts, _apply, op="attention")
"""``jquant.ops.attention`` with an ``Arrow`` or ``Band`` mask (half-width >= 1, self-attention) through this
kernel, once registered with ``register()``: in mode ``"pallas"`` anywhere, in mode ``"auto"`` on a GPU."""


def register() -> None:
    """Register ``ATTENTION_KERNEL`` with ``jquant.ops.dispatch`` (idempotent)."""
    from jquant.ops import dispatch

    dispatch.unregister_kernel(NAME)
    dispatch.register_kernel(ATTENTION_KERNEL)
