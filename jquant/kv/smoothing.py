"""WKVQuant's static channel smoothing of cached keys and values (spec §3.3), as parameters of an attention layer."""

from __future__ import annotations

import jax
from flax import nnx


class KVSmoothing(nnx.Module):
    """``x~ = (x - shift) / scale`` for keys and for values, each array ``[K * D]`` (an attention layer's
    ``kv_smoothing``; learned by ``jquant.kv.wkvquant``, saved with the other parameters)."""

    def __init__(self, k_shift: jax.Array, k_scale: jax.Array, v_shift: jax.Array, v_scale: jax.Array):
        self.k_shift, self.k_scale = nnx.Param(k_shift), nnx.Param(k_scale)
        self.v_shift, self.v_scale = nnx.Param(v_shift), nnx.Param(v_scale)

    def pairs(self) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """``((k_shift, k_scale), (v_shift, v_scale))`` as ``LayerKVCache.update`` and the quantizers take them."""
        return ((self.k_shift.get_value(), self.k_scale.get_value()), (self.v_shift.get_value(), self.v_scale.get_value()))
