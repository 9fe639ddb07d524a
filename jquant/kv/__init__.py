"""Key/value caches for incremental decoding: dense, or quantized with full-precision sink and window tokens.

``cache``: ``KVCacheConfig``, ``KVCache`` / ``LayerKVCache`` / ``KVStore``, ``init_cache``.
``quantizer``: ``KVQuantizer`` (min-max groups with a floating zero point: RTN, KIVI, SKVQ, WKVQuant)
and ``FormatKV`` (any jquant Format per token and head).
"""

from jquant.kv.cache import KVCache as KVCache
from jquant.kv.cache import KVCacheConfig as KVCacheConfig
from jquant.kv.cache import KVStore as KVStore
from jquant.kv.cache import LayerKVCache as LayerKVCache
from jquant.kv.cache import init_cache as init_cache
from jquant.kv.quantizer import FormatKV as FormatKV
from jquant.kv.quantizer import KVQuantizer as KVQuantizer

__all__ = ["FormatKV", "KVCache", "KVCacheConfig", "KVQuantizer", "KVStore", "LayerKVCache", "init_cache"]
