"""A key/value cache as a pytree: dense, or quantized with full-precision sink and window tokens.

The cache is a plain value threaded through the model call
(``logits, cache = model(tokens, cache=cache)``), so decoding is a pure
function that ``jit`` compiles once per (batch, chunk length).

A layer's ``KVCacheConfig`` says how keys and values are held (SKVQ §3.3, WKVQuant §3.2):

- ``sink`` first tokens stay in full precision (attention sinks);
- the ``window`` most recent tokens stay in full precision; a token is quantized **once**, by the
  layer's quantizer, when it leaves the window (KIVI's channel-wise key blocks: when the whole
  block has left it), and is read back dequantized from then on;
- ``past_only`` (WKVQuant's POQ, SKVQ's ``full_prefill``): the tokens of the current call attend
  to each other's exact keys and values; only earlier calls' tokens are read quantized;
- ``pre_rope``: keys are cached before RoPE and rotated after dequantization (SKVQ's choice).

Storage per layer and per tensor (``KVStore``): ``dense [B, S, K, D]`` when the tensor is not
quantized; otherwise ``packed`` (a ``QArray`` of the quantizer's format, one row per token or
token block on axis 1, ``ceil((S - sink) / block)`` rows), ``sink [B, sink, K, D]`` and ``recent [B, R, K, D]``, the
last ``R = window + block - 1`` tokens in position order. Everything is allocated at full
capacity, so ``KVCache.nbytes`` is the real footprint.

Shapes: ``B`` batch, ``S`` capacity, ``K`` key/value heads, ``D`` head dim, ``T`` new tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant.formats import Format
from jquant.formats import QArray
from jquant.kv.quantizer import FormatKV, KVQuantizer, Quantizer, Smoothing


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheConfig:
    """How one attention layer holds keys and values (static; see the module docstring).

    ``key``/``value``: a ``KVQuantizer`` or ``FormatKV`` (None: that tensor stays dense).
    """

    key: Quantizer | None = None
    value: Quantizer | None = None
    window: int = 0
    sink: int = 0
    pre_rope: bool = False
    past_only: bool = False

    def __post_init__(self):
        for name in ("window", "sink"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"KVCacheConfig.{name} must be a non-negative int, got {v!r}.")
        for name in ("key", "value"):
            q = getattr(self, name)
            if q is not None and not isinstance(q, (KVQuantizer, FormatKV)):
                raise TypeError(f"KVCacheConfig.{name} must be a KVQuantizer, FormatKV or None, got {type(q).__name__}; "
                                "wrap a jquant Format with FormatKV.of(fmt).")

    @staticmethod
    def of_format(fmt: Format | str) -> KVCacheConfig:
        """Keys and values quantized per token and head with a jquant Format (QuaRot/OSTQuant's KV4)."""
        q = FormatKV.of(fmt)
        return KVCacheConfig(key=q, value=q)

    @property
    def name(self) -> str:
        parts = [f"K:{getattr(self.key, 'name', 'float')}", f"V:{getattr(self.value, 'name', 'float')}"]
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.window:
            parts.append(f"window{self.window}")
        if self.pre_rope:
            parts.append("pre-rope")
        if self.past_only:
            parts.append("past-only")
        return " ".join(parts)

    @property
    def simple(self) -> bool:
        """Every cached token is quantized as it is written and read quantized (no sink/window/POQ/blocks)."""
        blocks = {q.block for q in (self.key, self.value) if q is not None}
        return not (self.window or self.sink or self.past_only) and blocks <= {1}

    def recent_length(self, q: Quantizer | None) -> int:
        """``R``: full-precision recent tokens kept for a tensor quantized by ``q``."""
        return 0 if q is None else (self.window + q.block - 1 if self.window or q.block > 1 else 0)

    def quantized_end(self, q: Quantizer | None, length: jax.Array) -> jax.Array:
        """Once ``length`` tokens are cached, positions in ``[sink, quantized_end)`` are held quantized."""
        if q is None:
            return jnp.asarray(self.sink, jnp.int32)
        past = jnp.maximum(jnp.asarray(length, jnp.int32) - self.window - self.sink, 0)
        return self.sink + past // q.block * q.block

    def quantized_mask(self, q: Quantizer | None, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """``[B, T, S]`` bool: whether the query at each position reads the key/value at each position quantized
        when the sequence is decoded token by token (the cache holds ``q_position + 1`` tokens then)."""
        qp, kp = q_positions[:, :, None], k_positions[:, None, :]
        if q is None:
            return jnp.zeros(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
        quantized = (kp >= self.sink) & (kp < self.quantized_end(q, qp + 1))
        return quantized & (kp != qp) if self.past_only else quantized

    def check(self, kv_heads: int, head_dim: int, max_context: int | None = None) -> None:
        """Raise when this config cannot cache ``kv_heads x head_dim`` keys of a model with ``max_context`` positions.

        A cache shorter than ``sink + window`` is fine (nothing in it is ever quantized); a window
        longer than the model's whole context is a mistake.
        """
        for q in (self.key, self.value):
            if q is not None:
                q.check(kv_heads, head_dim)
        if max_context is not None and self.sink + self.window > max_context:
            raise ValueError(f"KVCacheConfig: sink={self.sink} + window={self.window} tokens exceed the model's "
                             f"context of {max_context} positions, so nothing would ever be quantized; use a "
                             "smaller window.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStore:
    """Keys or values of one layer (see the module docstring for the fields' shapes)."""

    dense: jax.Array | None = None
    packed: QArray | None = None
    sink: jax.Array | None = None
    recent: jax.Array | None = None


def _rows(cfg: KVCacheConfig, q: Quantizer, capacity: int) -> int:
    return max(-(-(capacity - cfg.sink) // q.block), 0)


def _empty_store(cfg: KVCacheConfig, q: Quantizer | None, shape: tuple[int, int, int, int], dtype) -> KVStore:
    b, s, k, d = shape
    if q is None:
        return KVStore(dense=jnp.zeros(shape, dtype))
    rows = _rows(cfg, q, s)
    spec = jax.eval_shape(lambda x: q.encode(x), jax.ShapeDtypeStruct((b, rows * q.block, k, d), jnp.float32))
    r = cfg.recent_length(q)
    return KVStore(packed=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), spec),
                   sink=jnp.zeros((b, cfg.sink, k, d), dtype) if cfg.sink else None,
                   recent=jnp.zeros((b, r, k, d), dtype) if r else None)


def _write(store: KVStore, new: jax.Array, start: jax.Array, cfg: KVCacheConfig, q: Quantizer | None,
           smooth: Smoothing, capacity: int) -> KVStore:
    """Cache ``new [B, T, K, D]`` at positions ``start ..``; quantize every block that leaves the window."""
    if q is None:
        zero = jnp.zeros((), jnp.int32)
        return KVStore(dense=jax.lax.dynamic_update_slice(store.dense, new.astype(store.dense.dtype),
                                                          (zero, start, zero, zero)))
    b, t = new.shape[:2]
    start = jnp.asarray(start, jnp.int32)
    length = start + t
    sink = store.sink
    if cfg.sink:
        pos = start + jnp.arange(t, dtype=jnp.int32)
        sink = sink.at[:, jnp.where(pos < cfg.sink, pos, cfg.sink)].set(new.astype(sink.dtype), mode="drop")
    r = cfg.recent_length(q)
    pending = new if not r else jnp.concatenate([store.recent, new.astype(store.recent.dtype)], axis=1)
    recent = None if not r else pending[:, t:]
    # whole blocks (aligned at sink + j * block) of the pending tokens, positions start - r .. length - 1
    blk = q.block
    first = start - r
    offset = (cfg.sink - first) % blk
    n_blocks = -(-(r + t) // blk)
    padded = jnp.concatenate([pending, jnp.zeros((b, 2 * blk) + pending.shape[2:], pending.dtype)], axis=1)
    zero = jnp.zeros((), jnp.int32)
    chunk = jax.lax.dynamic_slice(padded, (zero, offset, zero, zero), (b, n_blocks * blk) + pending.shape[2:])
    block_start = first + offset + blk * jnp.arange(n_blocks, dtype=jnp.int32)
    leaving = (block_start >= cfg.quantized_end(q, start)) & (block_start + blk <= cfg.quantized_end(q, length))
    rows = _rows(cfg, q, capacity)
    index = jnp.where(leaving, (block_start - cfg.sink) // blk, rows)
    encoded = q.encode(chunk, smooth)
    written = {n: a.at[:, index].set(getattr(encoded, n), mode="drop") for n, a in store.packed.arrays().items()}
    packed = dataclasses.replace(store.packed, **written)
    return KVStore(packed=packed, sink=sink, recent=recent)


def _read(store: KVStore, new: jax.Array, start: jax.Array, cfg: KVCacheConfig, q: Quantizer | None,
          smooth: Smoothing, capacity: int) -> jax.Array:
    """Keys or values of every slot ``[B, S, K, D]`` in ``new.dtype`` as attention sees them after the write."""
    if q is None:
        return store.dense.astype(new.dtype)
    b, t, k, d = new.shape
    length = jnp.asarray(start, jnp.int32) + t
    rows = store.packed.shape[1]
    deq = q.decode(store.packed, (b, rows * q.block, k, d), smooth, new.dtype)
    full = jnp.concatenate([jnp.zeros((b, cfg.sink, k, d), new.dtype), deq], axis=1)[:, :capacity]
    pos = jnp.arange(capacity, dtype=jnp.int32)[None, :, None, None]
    r = cfg.recent_length(q)
    if r:
        recent = jnp.take(store.recent, jnp.clip(pos[0, :, 0, 0] - (length - r), 0, r - 1), axis=1).astype(new.dtype)
        full = jnp.where(pos >= cfg.quantized_end(q, length), recent, full)
    if cfg.sink:
        sink = jnp.take(store.sink, jnp.clip(pos[0, :, 0, 0], 0, cfg.sink - 1), axis=1).astype(new.dtype)
        full = jnp.where(pos < cfg.sink, sink, full)
    if cfg.past_only:
        current = jnp.take(new, jnp.clip(pos[0, :, 0, 0] - start, 0, t - 1), axis=1)
        full = jnp.where((pos >= start) & (pos < length), current, full)
    return full


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerKVCache:
    """One attention layer's cache: keys ``k`` and values ``v`` (``KVStore`` s) held as ``config`` says.

    Static: ``config`` (None: dense), ``capacity`` (tokens) and ``head_shape`` ``(K, D)``.
    """

    k: KVStore
    v: KVStore
    config: KVCacheConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
    capacity: int = dataclasses.field(default=0, metadata=dict(static=True))
    head_shape: tuple[int, int] = dataclasses.field(default=(0, 0), metadata=dict(static=True))

    def update(self, k_new: jax.Array, v_new: jax.Array, start: jax.Array,
               smoothing: tuple[Smoothing, Smoothing] = (None, None)) -> tuple[LayerKVCache, jax.Array, jax.Array]:
        """Write ``k_new``/``v_new`` ``[B, T, K, D]`` at positions ``start .. start+T-1``.

        ``smoothing``: WKVQuant's (shift, scale) for keys and for values, or None.
        Returns the new cache and the keys and values of every slot ``[B, S, K, D]`` in
        ``k_new.dtype`` as attention reads them (slots at or beyond ``start + T`` hold stale
        data and must be masked by the caller).
        """
        cfg = self.config or KVCacheConfig()
        if tuple(k_new.shape[2:]) != self.head_shape or v_new.shape != k_new.shape:
            raise ValueError(f"LayerKVCache.update: the cache holds {self.head_shape} (heads, head_dim) per token but "
                             f"got keys {tuple(k_new.shape[2:])} and values {tuple(v_new.shape[2:])}; build the cache "
                             "for this model with model.init_cache(...).")
        k = _write(self.k, k_new, start, cfg, cfg.key, smoothing[0], self.capacity)
        v = _write(self.v, v_new, start, cfg, cfg.value, smoothing[1], self.capacity)
        k_all = _read(k, k_new, start, cfg, cfg.key, smoothing[0], self.capacity)
        v_all = _read(v, v_new, start, cfg, cfg.value, smoothing[1], self.capacity)
        return dataclasses.replace(self, k=k, v=v), k_all, v_all


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus ``length``, the number of filled slots (int32 scalar)."""

    layers: tuple[LayerKVCache, ...]
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (codes, scales, zero points, sink, window, dense tensors)."""
        return _nbytes(self.layers)

    def bits_per_element(self) -> float:
        """``8 * nbytes`` over the ``2 * layers * B * S * K * D`` cached key and value elements."""
        elements = sum(2 * jax.tree.leaves(layer)[0].shape[0] * layer.capacity * layer.head_shape[0] * layer.head_shape[1]
                       for layer in self.layers)
        return 8.0 * self.nbytes / elements


def init_cache(
    *,
    num_layers: int,
    batch: int,
    capacity: int,
    kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    configs: tuple[KVCacheConfig | Format | str | None, ...] | KVCacheConfig | Format | str | None = None,
    max_context: int | None = None,
) -> KVCache:
    """An empty cache with room for ``capacity`` tokens per sequence.

    ``configs``: None (dense, ``dtype``), one ``KVCacheConfig`` for every layer, or one per layer
    (None entries stay dense). A jquant Format or its name means ``KVCacheConfig.of_format``.
    ``max_context``: the model's number of positions; a sink plus window longer than it is an error.
    """
    if capacity <= 0:
        raise ValueError(f"init_cache: capacity must be positive, got {capacity}.")
    if not isinstance(configs, tuple):
        configs = (configs,) * num_layers
    if len(configs) != num_layers:
        raise ValueError(f"init_cache: configs has {len(configs)} entries for {num_layers} layers.")
    shape = (batch, capacity, kv_heads, head_dim)
    layers = []
    for i, cfg in enumerate(configs):
        if isinstance(cfg, (Format, str)):
            cfg = KVCacheConfig.of_format(cfg)
        if cfg is not None:
            try:
                cfg.check(kv_heads, head_dim, max_context)
            except ValueError as err:
                raise ValueError(f"init_cache: layer {i}: {err}") from None
        c = cfg or KVCacheConfig()
        layers.append(LayerKVCache(k=_empty_store(c, c.key, shape, dtype), v=_empty_store(c, c.value, shape, dtype),
                                   config=cfg, capacity=capacity, head_shape=(kv_heads, head_dim)))
    return KVCache(layers=tuple(layers), length=jnp.zeros((), jnp.int32))
