"""Attention masks as small static descriptions: which (query, key) pairs may attend.

Positions are absolute: query row ``r`` sits at position ``i = q_offset + r`` (``q_offset``: the
first query's position, e.g. the cache slot a decode step writes), key column ``j`` at ``j``.
Each mask defines ``allowed(i, j)``:

- ``Full()``: every pair.
- ``Causal()``: ``j <= i``.
- ``SlidingWindow(window)``: ``i - window < j <= i`` (causal, ``window`` keys including the query's own; Mistral).
- ``Band(half_width)``: ``|i - j| <= half_width`` (bidirectional local attention).
- ``Arrow(n_text, half_width, text_start=0)``: DiTFastAttnV2's arrow pattern for joint text-image attention:
  text tokens ``T = [text_start, text_start + n_text)`` attend to all and are attended by all, the other
  (image) tokens attend to the text and to a band of half-width ``half_width`` around themselves:
  ``i ∈ T or j ∈ T or |i - j| <= half_width``.
- ``Padding(lengths)``: key ``j`` of sequence ``b`` is real, ``j < lengths[b]`` (``lengths [B]`` is data, not static).
- ``a & b`` (``And``): both allow the pair, e.g. ``Causal() & Padding(lengths)``.

``mask.dense(q_len, k_len, q_offset)`` is the reference boolean matrix ``[Tq, Tk]`` (``[B, Tq, Tk]`` when
the mask depends on ``lengths``); a numpy array when the mask and ``q_offset`` are static, so it is a
compile-time constant under ``jit``. ``mask.block_layout(q_len, k_len, block_q, block_k)`` is ``[nq, nk]``:
True for the ``block_q x block_k`` tiles that hold at least one allowed pair, the tiles a block-sparse
kernel must compute (``Causal``, ``SlidingWindow``, ``Band`` and ``Arrow`` compute it from intervals,
other masks by reducing ``dense``).

The masks are frozen dataclasses, not pytrees: build them inside the traced function (``Padding`` holding
a traced ``lengths`` there is fine).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Offset = int | jax.Array


def _positive(value: int, name: str, where: str, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: {name}={value!r} must be an int >= {minimum}.")


class Mask:
    """Base class: subclasses define ``allowed(i, j)`` on broadcast position arrays (numpy or jax)."""

    dynamic = False  # True when the mask depends on data (Padding's lengths): dense() is then a jax array

    def allowed(self, i, j):
        """Bool array broadcast from query positions ``i [Tq, 1]`` and key positions ``j [1, Tk]``."""
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)

    def dense(self, q_len: int, k_len: int, q_offset: Offset = 0) -> np.ndarray | jax.Array:
        """``[Tq, Tk]`` bool (``[B, Tq, Tk]`` for a mask with ``Padding``): True where query ``q_offset + r``
        may attend key ``c``."""
        _positive(q_len, "q_len", f"{type(self).__name__}.dense")
        _positive(k_len, "k_len", f"{type(self).__name__}.dense")
        i = np.arange(q_len)[:, None] + (q_offset if isinstance(q_offset, (int, np.integer)) else jnp.asarray(q_offset))
        return self.allowed(i, np.arange(k_len)[None, :])

    def block_layout(self, q_len: int, k_len: int, block_q: int, block_k: int, q_offset: int = 0) -> np.ndarray | jax.Array:
        """``[ceil(Tq / block_q), ceil(Tk / block_k)]`` bool: tiles with at least one allowed pair (by reducing
        ``dense``; ``[B, nq, nk]`` for a mask with ``Padding``)."""
        _positive(block_q, "block_q", f"{type(self).__name__}.block_layout")
        _positive(block_k, "block_k", f"{type(self).__name__}.block_layout")
        d = self.dense(q_len, k_len, q_offset)
        xp = np if isinstance(d, np.ndarray) else jnp
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        d = xp.broadcast_to(d, d.shape[:-2] + (q_len, k_len))
        pad = [(0, 0)] * (d.ndim - 2) + [(0, nq * block_q - q_len), (0, nk * block_k - k_len)]
        tiles = xp.pad(d, pad).reshape(*d.shape[:-2], nq, block_q, nk, block_k)
        return tiles.any(axis=(-3, -1))


class _IntervalMask(Mask):
    """A static mask whose block layout follows from per-tile position intervals."""

    def tile_allowed(self, qa, qb, ka, kb):
        """Whether some query in ``[qa, qb]`` may attend some key in ``[ka, kb]`` (inclusive, numpy arrays)."""
        raise NotImplementedError

    def block_layout(self, q_len: int, k_len: int, block_q: int, block_k: int, q_offset: int = 0) -> np.ndarray:
        """``[nq, nk]`` bool from interval arithmetic (exactly the tiles ``dense`` has an allowed pair in)."""
        where = f"{type(self).__name__}.block_layout"
        for value, name in ((q_len, "q_len"), (k_len, "k_len"), (block_q, "block_q"), (block_k, "block_k")):
            _positive(value, name, where)
        _positive(q_offset, "q_offset", where, minimum=0)
        qa = np.arange(0, q_len, block_q)[:, None] + q_offset
        qb = np.minimum(qa + block_q, q_len + q_offset) - 1
        ka = np.arange(0, k_len, block_k)[None, :]
        kb = np.minimum(ka + block_k, k_len) - 1
        return np.broadcast_to(self.tile_allowed(qa, qb, ka, kb), (qa.shape[0], ka.shape[1]))


@dataclasses.dataclass(frozen=True)
class Full(_IntervalMask):
    """Every query attends every key (bidirectional attention)."""

    def allowed(self, i, j):
        return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), bool)

    def tile_allowed(self, qa, qb, ka, kb):
        return np.ones(np.broadcast_shapes(qa.shape, ka.shape), bool)


@dataclasses.dataclass(frozen=True)
class Causal(_IntervalMask):
    """``j <= i``."""

    def allowed(self, i, j):
        return j <= i

    def tile_allowed(self, qa, qb, ka, kb):
        return ka <= qb


@dataclasses.dataclass(frozen=True)
class SlidingWindow(_IntervalMask):
    """``i - window < j <= i``: causal, the last ``window`` keys (the query's own included)."""

    window: int

    def __post_init__(self):
        _positive(self.window, "window", "SlidingWindow")

    def allowed(self, i, j):
        return (j <= i) & (j > i - self.window)

    def tile_allowed(self, qa, qb, ka, kb):
        return (ka <= qb) & (kb > qa - self.window)


@dataclasses.dataclass(frozen=True)
class Band(_IntervalMask):
    """``|i - j| <= half_width``: bidirectional local attention."""

    half_width: int

    def __post_init__(self):
        _positive(self.half_width, "half_width", "Band", minimum=0)

    def allowed(self, i, j):
        return abs(i - j) <= self.half_width

    def tile_allowed(self, qa, qb, ka, kb):
        return (ka <= qb + self.half_width) & (kb >= qa - self.half_width)


@dataclasses.dataclass(frozen=True)
class Arrow(_IntervalMask):
    """DiTFastAttnV2's arrow: ``i ∈ T or j ∈ T or |i - j| <= half_width`` with text ``T = [text_start, text_start + n_text)``.

    Flux puts the text first (``text_start=0``); SD3's joint attention puts it after ``N`` image tokens
    (``text_start=N``).
    """

    n_text: int
    half_width: int
    text_start: int = 0

    def __post_init__(self):
        _positive(self.n_text, "n_text", "Arrow", minimum=0)
        _positive(self.half_width, "half_width", "Arrow", minimum=0)
        _positive(self.text_start, "text_start", "Arrow", minimum=0)

    def _text(self, p):
        return (p >= self.text_start) & (p < self.text_start + self.n_text)

    def allowed(self, i, j):
        return self._text(i) | self._text(j) | (abs(i - j) <= self.half_width)

    def tile_allowed(self, qa, qb, ka, kb):
        end = self.text_start + self.n_text  # a tile touches the text when its interval meets [text_start, end)
        q_text = (qa < end) & (qb >= self.text_start) & (self.n_text > 0)
        k_text = (ka < end) & (kb >= self.text_start) & (self.n_text > 0)
        return q_text | k_text | ((ka <= qb + self.half_width) & (kb >= qa - self.half_width))


@dataclasses.dataclass(frozen=True, eq=False)
class Padding(Mask):
    """Key ``j`` of sequence ``b`` is real when ``j < lengths[b]``; ``lengths [B]`` ints (data: may be traced)."""

    lengths: jax.Array

    dynamic = True

    def __post_init__(self):
        if jnp.ndim(self.lengths) != 1 or not jnp.issubdtype(jnp.asarray(self.lengths).dtype, jnp.integer):
            raise ValueError(f"Padding: lengths must be a [B] integer array of key lengths, got shape "
                             f"{jnp.shape(self.lengths)} and dtype {jnp.asarray(self.lengths).dtype}.")

    def allowed(self, i, j):
        keys = j < jnp.asarray(self.lengths)[:, None, None]  # [B, 1, Tk]
        return jnp.broadcast_to(keys, (keys.shape[0], np.shape(i)[0], keys.shape[-1]))


@dataclasses.dataclass(frozen=True, eq=False)
class And(Mask):
    """Pairs both masks allow (``a & b``)."""

    a: Mask
    b: Mask

    @property
    def dynamic(self) -> bool:
        return self.a.dynamic or self.b.dynamic

    def allowed(self, i, j):
        return self.a.allowed(i, j) & self.b.allowed(i, j)
