"""Key/value caches for incremental decoding, and the KV-cache quantization methods.

- ``cache``: ``KVCacheConfig`` (sink, window, past-only, pre-RoPE keys), ``KVCache`` / ``LayerKVCache`` /
  ``KVStore``, ``init_cache``;
- ``quantizer``: ``KVQuantizer`` (min-max groups with a floating zero point, channel reorder, variable
  groups, KIVI channel blocks, 1.5-bit ternary codes, fp8 metadata) and ``FormatKV`` (any jquant Format);
- ``baselines``: ``rtn``, ``kivi``; ``skvq``: SKVQ; ``wkvquant``: WKVQuant's config and block training
  (``smoothing.KVSmoothing``; the entry point with the weights' report is ``jquant.methods.wkvquant``);
- ``calibrate``: ``capture_kv``, ``attention_errors``, ``set_kv_cache``; ``serialize``: configs as JSON (checkpoints);
- ``decode_attention``: attention read from the cache's segments (the fused kernel's reference).
"""

from jquant.kv.cache import KVCache as KVCache
from jquant.kv.cache import KVCacheConfig as KVCacheConfig
from jquant.kv.cache import KVStore as KVStore
from jquant.kv.cache import LayerKVCache as LayerKVCache
from jquant.kv.cache import init_cache as init_cache
from jquant.kv.quantizer import FormatKV as FormatKV
from jquant.kv.quantizer import KVQuantizer as KVQuantizer

_LAZY = {"rtn": "baselines", "kivi": "baselines", "SKVQConfig": "skvq", "skvq": "skvq",
         "WKVQuantConfig": "wkvquant", "capture_kv": "calibrate",
         "attention_errors": "calibrate", "set_kv_cache": "calibrate", "decode_attention": "decode_attention"}
__all__ = ["FormatKV", "KVCache", "KVCacheConfig", "KVQuantizer", "KVStore", "LayerKVCache", "init_cache", *sorted(_LAZY)]


def __getattr__(name: str):
    """The methods load on first use (they need the calibration machinery, which imports model layers)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"jquant.kv.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jquant.kv' has no attribute {name!r}")
