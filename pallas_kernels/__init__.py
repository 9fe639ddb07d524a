"""Pallas kernels (imported as ``jquant.pallas_kernels``); each file holds one kernel and its pure-jnp reference.

``arrow_attention`` here is the entry point (the function); its module is
``importlib.import_module("jquant.pallas_kernels.arrow_attention")``.
"""

from .arrow_attention import arrow_attention as arrow_attention
from .arrow_attention import arrow_attention_reference as arrow_attention_reference
from .arrow_attention import arrow_tile_count as arrow_tile_count
