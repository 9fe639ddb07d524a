"""Head-wise local attention over a joint text + image sequence (DiTFastAttn V1 windows, V2 arrows).

Shapes: ``q, k, v [B, S, H, D]`` with ``S = n_image + n_text``; the text occupies ``[text_start, text_start +
n_text)`` (``text_start`` is 0 or ``n_image``). ``windows [H]`` int per head:

- ``-1``: full attention;
- ``0``: the head is not computed (its output is zeros; the caller substitutes a cached output);
- ``w >= 1``: ``pattern="arrow"``: ``jquant.ops.mask.Arrow(n_text, w, text_start)`` (text rows and columns
  dense, a band of half-width ``w`` over the image tokens); ``pattern="band"``: ``jquant.ops.mask.Band(w)`` over
  the whole sequence.

``local_attention_reference`` evaluates the dense per-head mask (``windows`` may be traced: one program for
every plan). ``local_attention_table`` takes traced windows too and runs either that reference
(``implementation="xla"``) or the Pallas arrow kernel (``"pallas"``, ``jquant.pallas_kernels.arrow_attention``:
one flash-attention launch for all heads that skips the KV tiles outside each head's arrow; interpret mode off a
GPU). ``local_attention`` takes static windows and only computes what the mask allows: the heads are
grouped by window; full heads run ``jquant.ops.attention``; a local head's image (arrow) or all (band) queries
score only the keys of their band (gathered, ``2 w + 1`` per query) and, for arrows, the text keys; arrow text
queries attend to all keys. Both give ``softmax(q k^T / sqrt(D) + mask) v`` with float32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant.ops.attention import attention
from jquant.ops.mask import Full

PATTERNS = ("arrow", "band")
IMPLEMENTATIONS = ("xla", "pallas")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check(q, windows_len: int, n_text: int, text_start: int, pattern: str) -> int:
    b, s, h, d = q.shape
    if pattern not in PATTERNS:
        raise ValueError(f"local attention: pattern={pattern!r} is not one of {PATTERNS}.")
    if windows_len != h:
        raise ValueError(f"local attention: {windows_len} windows for {h} heads; give one window per head.")
    n_image = s - n_text
    if n_image < 1 or text_start not in (0, n_image):
        raise ValueError(f"local attention: {n_text} text tokens at {text_start} do not fit a sequence of {s} with "
                         "the text first (0) or last (n_image).")
    return n_image


def head_masks(windows: jax.Array, *, length: int, n_text: int, text_start: int, pattern: str) -> jax.Array:
    """``[H, S, S]`` bool: the per-head masks of the module docstring (windows may be traced; ``0`` -> all True)."""
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    w = jnp.asarray(windows)[:, None, None]
    near = np.abs(i - j)[None] <= w
    if pattern == "arrow":
        text = (np.arange(length) >= text_start) & (np.arange(length) < text_start + n_text)
        near = near | (text[:, None] | text[None, :])[None]
    return near | (w < 1)


def local_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, windows: jax.Array, *, n_text: int,
                              text_start: int, pattern: str = "arrow", scale: float | None = None) -> jax.Array:
    """Dense masked reference ``[B, S, H, D]``: per-head masks (``head_masks``), zeros for heads with window 0."""
    b, s, h, d = q.shape
    _check(q, int(np.shape(windows)[0]), n_text, text_start, pattern)
    scale = d**-0.5 if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST, preferred_element_type=acc) * scale
    mask = head_masks(windows, length=s, n_text=n_text, text_start=text_start, pattern=pattern)
    probs = jax.nn.softmax(jnp.where(mask[None], logits, jnp.finfo(acc).min), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=_HIGHEST, preferred_element_type=acc)
    computed = jnp.asarray(windows) != 0
    return jnp.where(computed[None, None, :, None], out, 0).astype(q.dtype)


def _banded(q: jax.Array, k: jax.Array, v: jax.Array, w: int, k_dense: jax.Array | None, v_dense: jax.Array | None,
            scale: float) -> jax.Array:
    """Queries ``q [B, n, H, D]`` at positions ``0..n-1`` of ``k, v [B, n, H, D]`` attend to keys ``|i - j| <= w``
    (gathered) and to every key of ``k_dense, v_dense [B, m, H, D]`` (or none) -> ``[B, n, H, D]``."""
    n = q.shape[1]
    offsets = np.arange(-w, w + 1)
    index = np.arange(n)[:, None] + offsets[None, :]
    valid = (index >= 0) & (index < n)
    index = np.clip(index, 0, n - 1)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    k_band, v_band = k[:, index], v[:, index]  # [B, n, 2w+1, H, D]
    logits = jnp.einsum("bnhd,bnjhd->bhnj", q, k_band, precision=_HIGHEST, preferred_element_type=acc) * scale
    logits = jnp.where(valid[None, None], logits, jnp.finfo(acc).min)
    if k_dense is not None:
        dense = jnp.einsum("bnhd,bmhd->bhnm", q, k_dense, precision=_HIGHEST, preferred_element_type=acc) * scale
        logits = jnp.concatenate([dense, logits], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    m = 0 if k_dense is None else k_dense.shape[1]
    out = jnp.einsum("bhnj,bnjhd->bnhd", probs[..., m:], v_band, precision=_HIGHEST, preferred_element_type=acc)
    if k_dense is not None:
        out = out + jnp.einsum("bhnm,bmhd->bnhd", probs[..., :m], v_dense, precision=_HIGHEST,
                               preferred_element_type=acc)
    return out


def _local_heads(q, k, v, w: int, *, n_text: int, text_start: int, pattern: str, scale: float) -> jax.Array:
    """Static window ``w >= 1`` for all heads of ``q, k, v [B, S, h, D]`` -> ``[B, S, h, D]`` (float32 or wider)."""
    s = q.shape[1]
    if pattern == "band":
        return _banded(q, k, v, min(w, s - 1), None, None, scale)
    n_image = s - n_text
    img = slice(n_text, s) if text_start == 0 else slice(0, n_image)
    txt = slice(0, n_text) if text_start == 0 else slice(n_image, s)
    k_text, v_text = (k[:, txt], v[:, txt]) if n_text else (None, None)
    image_out = _banded(q[:, img], k[:, img], v[:, img], min(w, n_image - 1), k_text, v_text, scale)
    if not n_text:
        return image_out
    text_out = attention(q[:, txt], k, v, Full(), scale=scale).astype(image_out.dtype)
    parts = (text_out, image_out) if text_start == 0 else (image_out, text_out)
    return jnp.concatenate(parts, axis=1)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, windows: Sequence[int], *, n_text: int,
                    text_start: int, pattern: str = "arrow", scale: float | None = None) -> jax.Array:
    """The module docstring's computing path for static ``windows`` (Python ints) -> ``[B, S, H, D]``."""
    windows = [int(x) for x in windows]
    _check(q, len(windows), n_text, text_start, pattern)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    parts: list[jax.Array] = []
    order: list[int] = []
    for w in sorted(set(windows)):
        heads = [h for h, x in enumerate(windows) if x == w]
        order += heads
        qh, kh, vh = (t[:, :, heads] for t in (q, k, v))
        if w == -1:
            parts.append(attention(qh, kh, vh, Full(), scale=scale))
        elif w == 0:
            parts.append(jnp.zeros(qh.shape, q.dtype))
        else:
            parts.append(_local_heads(qh, kh, vh, w, n_text=n_text, text_start=text_start, pattern=pattern,
                                      scale=scale).astype(q.dtype))
    out = jnp.concatenate(parts, axis=2)
    return out[:, :, np.argsort(order)]


def local_attention_table(q: jax.Array, k: jax.Array, v: jax.Array, windows: jax.Array, *, n_text: int,
                          text_start: int, pattern: str = "arrow", implementation: str = "xla",
                          scale: float | None = None) -> jax.Array:
    """Per-head windows as data (``[H]``, may be traced) -> ``[B, S, H, D]``, by ``implementation`` (module
    docstring); the Pallas kernel draws arrows only."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"local attention: implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    if implementation == "xla":
        return local_attention_reference(q, k, v, windows, n_text=n_text, text_start=text_start, pattern=pattern,
                                         scale=scale)
    if pattern != "arrow":
        raise ValueError(f"local attention: the Pallas kernel draws arrows; pattern={pattern!r} needs "
                         "implementation='xla'.")
    _check(q, int(np.shape(windows)[0]), n_text, text_start, pattern)
    from jquant.pallas_kernels import arrow_attention

    return arrow_attention(q, k, v, jnp.asarray(windows, jnp.int32), n_text=n_text, text_start=text_start,
                           scale=scale)
