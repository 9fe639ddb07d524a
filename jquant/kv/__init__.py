"""Key/value caches for incremental decoding: dense, or quantized per token and head."""

from jquant.kv.cache import KVCache as KVCache
from jquant.kv.cache import LayerKVCache as LayerKVCache
from jquant.kv.cache import init_cache as init_cache

__all__ = ["KVCache", "LayerKVCache", "init_cache"]
