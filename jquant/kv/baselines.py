"""The KV-cache baselines the papers compare against, as ``KVCacheConfig`` s.

- ``rtn``: per-token round-to-nearest, min-max groups of ``group_size`` channels (``head_dim``: one
  group per head), float16 scale and zero point, nothing kept in full precision.
- ``kivi`` (Liu et al., 2024): keys per channel over blocks of ``group_size`` tokens (a block is
  quantized once all its tokens are known, so up to ``group_size - 1`` recent keys stay exact),
  values per token in groups of ``group_size`` channels; ``window`` extra recent tokens in full
  precision (KIVI's residual length beyond the block).
"""

from __future__ import annotations

from jquant.kv.cache import KVCacheConfig
from jquant.kv.quantizer import KVQuantizer


def rtn(key_bits: float, value_bits: float, *, group_size: int, meta_dtype: str = "float16") -> KVCacheConfig:
    """Per-token min-max quantization of keys (after RoPE) and values."""
    return KVCacheConfig(key=KVQuantizer(bits=key_bits, group_size=group_size, meta_dtype=meta_dtype),
                         value=KVQuantizer(bits=value_bits, group_size=group_size, meta_dtype=meta_dtype))


def kivi(key_bits: float, value_bits: float, *, group_size: int, window: int = 0,
         meta_dtype: str = "float16") -> KVCacheConfig:
    """KIVI: channel-wise key blocks of ``group_size`` tokens, token-wise value groups of ``group_size`` channels."""
    return KVCacheConfig(key=KVQuantizer(bits=key_bits, axis="channel", group_size=group_size, meta_dtype=meta_dtype),
                         value=KVQuantizer(bits=value_bits, group_size=group_size, meta_dtype=meta_dtype),
                         window=window)
