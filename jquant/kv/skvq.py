"""SKVQ (Duanmu et al., COLM 2024): channel reordering, clipped dynamic group quantization, sink + window.

Per layer, and separately for keys and values (spec §3.1, §3.5):

1. Per-channel ``(min_c, max_c)`` of the calibration keys (before RoPE when ``pre_rope``, the
   recommended setting) and values over all tokens.
2. k-means (``jquant.numerics.kmeans``, k-means++, ``n_init`` starts) on the 2-D points
   ``(min_c, max_c)`` into ``C / group_size`` clusters. The permutation ``argsort(label)`` puts a
   cluster's channels together; the clusters are the groups, of variable size (``balanced``:
   channels sorted by (cluster, mid-range) and cut into fixed groups of ``group_size``, the layout
   a kernel prefers, spec §7.2). Clusters span heads (keys are quantized per token, so that is fine).
3. Clip ratio ``alpha``: one value for every layer (the released code: 0.92 for long context,
   0.96 for perplexity), or ``clip="search"``: per layer, the value of ``clip_grid``
   (default ``0.80, 0.81, ..., 1.00``) with the smallest attention-output error on the calibration tokens
   (the paper's objective, per layer rather than per group as the spec recommends, §7.1).
4. Run time: sink tokens (5) and a window of recent tokens (128) in full precision, each other token
   quantized once as it leaves the window (``jquant.kv.cache``), FP8 scales and zero points.

Keys quantized before RoPE cost a RoPE on every read; the cache applies it after dequantizing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from jquant.kv.cache import KVCacheConfig
from jquant.kv.calibrate import attention_errors, capture_kv, set_kv_cache
from jquant.kv.quantizer import KVQuantizer
from jquant.numerics.kmeans import kmeans

CLIP_GRID = tuple(round(0.80 + 0.01 * i, 2) for i in range(21))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SKVQConfig:
    """SKVQ settings; defaults are the README's ``k2-v2-g128-w128-reorder-pre_rope-clip-sink5-fp8``
    with a group size suited to small models (``group_size`` channels per group on average)."""

    key_bits: float = 2
    value_bits: float = 2
    group_size: int = 32
    window: int = 128
    sink: int = 5
    clip: float | str = 0.92
    clip_grid: tuple[float, ...] = CLIP_GRID
    pre_rope: bool = True
    reorder: bool = True
    balanced: bool = False
    meta_dtype: str = "float8_e4m3fn"
    past_only: bool = False
    n_init: int = 10
    seed: int = 0

    def __post_init__(self):
        if not (self.clip == "search" or (isinstance(self.clip, float | int) and 0 < self.clip <= 1)):
            raise ValueError(f"SKVQConfig.clip must be in (0, 1] or 'search', got {self.clip!r}.")


@dataclasses.dataclass(frozen=True)
class SKVQReport:
    """Per layer: the clip ratio chosen and the key/value group sizes (in permuted order); with a search,
    ``search_errors[clip][layer]``: each layer's attention-output error with every layer at that clip."""

    clip: dict[str, float]
    key_groups: dict[str, tuple[int, ...]]
    value_groups: dict[str, tuple[int, ...]]
    search_errors: dict[float, dict[str, float]] = dataclasses.field(default_factory=dict)


def channel_groups(low: np.ndarray, high: np.ndarray, group_size: int, *, balanced: bool = False,
                   n_init: int = 10, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """SKVQ's reorder: k-means of the per-channel ``(min, max)`` points -> (permutation, group sizes).

    ``low``, ``high``: ``[C]``. ``C / group_size`` clusters; empty clusters are dropped.
    """
    c = len(low)
    if c % group_size:
        raise ValueError(f"SKVQ: group_size={group_size} does not divide the {c} key/value channels of a token.")
    points = np.stack([low, high], axis=1).astype(np.float64)
    labels = kmeans(points, c // group_size, seed=seed, n_init=n_init).labels
    if balanced:
        perm = np.lexsort(((low + high) / 2, labels))
        return tuple(int(i) for i in perm), (group_size,) * (c // group_size)
    perm = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=c // group_size)
    return tuple(int(i) for i in perm), tuple(int(s) for s in sizes if s)


def _quantizer(bits, perm_sizes, clip, cfg: SKVQConfig, channels: int) -> KVQuantizer:
    if perm_sizes is None:
        return KVQuantizer(bits=bits, group_size=cfg.group_size, clip=clip, meta_dtype=cfg.meta_dtype)
    perm, sizes = perm_sizes
    uniform = len(set(sizes)) == 1 and sizes[0] * len(sizes) == channels
    return KVQuantizer(bits=bits, perm=perm, clip=clip, meta_dtype=cfg.meta_dtype,
                       **({"group_size": sizes[0]} if uniform else {"group_sizes": sizes}))


def skvq(model: nnx.Module, calib_tokens: np.ndarray, config: SKVQConfig = SKVQConfig(), *,
         batch_size: int = 4) -> tuple[nnx.Module, SKVQReport]:
    """A copy of ``model`` whose attention layers cache keys and values the SKVQ way, and what was chosen.

    ``calib_tokens [N, T]``: calibration windows (the paper: 256 x 4096 WikiText2 tokens; a few
    thousand tokens suffice for the statistics of a small model).
    """
    samples = capture_kv(model, calib_tokens, batch_size=batch_size)
    groups = {}
    for path, s in samples.items():
        if config.reorder:
            k_range = s.channel_range(s.keys(config.pre_rope))
            v_range = s.channel_range(s.v)
            kw = dict(balanced=config.balanced, n_init=config.n_init, seed=config.seed)
            groups[path] = (channel_groups(*k_range, config.group_size, **kw),
                            channel_groups(*v_range, config.group_size, **kw))
        else:
            groups[path] = (None, None)
    channels = {p: s.k.shape[2] * s.k.shape[3] for p, s in samples.items()}

    def configs(clip: float) -> dict[str, KVCacheConfig]:
        return {p: KVCacheConfig(key=_quantizer(config.key_bits, groups[p][0], clip, config, channels[p]),
                                 value=_quantizer(config.value_bits, groups[p][1], clip, config, channels[p]),
                                 window=config.window, sink=config.sink, pre_rope=config.pre_rope,
                                 past_only=config.past_only)
                for p in samples}

    out = nnx.clone(model)
    errors: dict[float, dict[str, float]] = {}
    if config.clip == "search":
        for clip in config.clip_grid:
            set_kv_cache(out, configs(clip))
            errors[clip] = attention_errors(out, calib_tokens, batch_size=batch_size)
        chosen = {p: min(config.clip_grid, key=lambda c: (errors[c][p], -c)) for p in samples}
    else:
        chosen = {p: float(config.clip) for p in samples}
    layers = {p: configs(chosen[p])[p] for p in samples}
    set_kv_cache(out, layers)
    report = SKVQReport(clip=chosen,
                        key_groups={p: tuple(c.key.groups(channels[p]).tolist()) for p, c in layers.items()},
                        value_groups={p: tuple(c.value.groups(channels[p]).tolist()) for p, c in layers.items()},
                        search_errors=errors)
    return out, report
