"""Running one sampler step under an attention plan (spec §3.5): the attention hook a family's blocks call.

A family that takes part accepts ``attention=`` in ``flow_velocity`` and calls ``attention(layer, q, k, v)`` for its
joint attention (``q, k, v [B, S, H, D]`` in the family's joint order, returning ``[B, S, H, D]`` before the output
projection), and describes its token order with ``joint_layout(latent_shape, text_len) -> JointLayout``.

``StepAttention(windows [L, H], residual [L, H], cache, ...)`` is that hook for one step: it runs each head as the
plan says (``jquant.ops.local_attention``), substitutes reused heads from ``cache.outputs`` (the previous step's
planned outputs), applies V1's residual sharing, and records this step's outputs into the new ``HeadCache``
(``new_cache()``). With numpy windows it computes only what the plan allows (static shapes, one program per
distinct step); with traced windows it evaluates the dense masks (``implementation="xla"``) or runs the Pallas
arrow kernel (``"pallas"``, which skips the tiles outside each arrow): one program for every plan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant import ops
from jquant.ditfastattn.plan import ADD, REFRESH, REUSE, JointLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadCache:
    """Per-layer head outputs of the previous step and V1 residuals: ``outputs, residuals [L, B, S, H, D]``."""

    outputs: jax.Array
    residuals: jax.Array

    @classmethod
    def zeros(cls, layers: int, batch: int, length: int, heads: int, head_dim: int,
              dtype=jnp.float32) -> HeadCache:
        shape = (layers, batch, length, heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _per_head(flags: jax.Array | np.ndarray) -> jax.Array:
    return jnp.asarray(flags)[None, None, :, None]


class StepAttention:
    """The attention hook of one step (module docstring). Call it as ``hook(layer, q, k, v)``; after the model ran,
    ``new_cache()`` holds every layer's planned outputs (and residuals)."""

    def __init__(self, windows, residual, cache: HeadCache, layout: JointLayout, pattern: str,
                 implementation: str = "xla"):
        self.windows, self.residual, self.cache = windows, residual, cache
        self.layout, self.pattern, self.implementation = layout, pattern, implementation
        self.static = isinstance(windows, np.ndarray) and isinstance(residual, np.ndarray)
        self._outputs: dict[int, jax.Array] = {}
        self._residuals: dict[int, jax.Array] = {}

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if q.shape[1] != self.layout.length:
            raise ValueError(f"the attention plan is for {self.layout.length} joint tokens but layer {layer} attends "
                             f"over {q.shape[1]}; make a plan for this resolution and text length.")
        w, r = self.windows[layer], self.residual[layer]
        options = dict(n_text=self.layout.n_text, text_start=self.layout.text_start, pattern=self.pattern)
        if self.static:
            local = ops.local_attention(q, k, v, [int(x) for x in w], **options)
        else:
            local = ops.local_attention_table(q, k, v, w, implementation=self.implementation, **options)
        previous = self.cache.outputs[layer].astype(local.dtype)
        out = jnp.where(_per_head(w == REUSE), previous, local)
        resid = self.cache.residuals[layer]
        if not self.static or np.any(r != 0):
            full = ops.attention(q, k, v, ops.Full()).astype(local.dtype)
            refresh, add = _per_head(r == REFRESH), _per_head(r == ADD)
            resid = jnp.where(refresh, full - local, resid)
            out = jnp.where(refresh, full, jnp.where(add, local + resid.astype(local.dtype), out))
        self._outputs[layer] = out.astype(self.cache.outputs.dtype)
        self._residuals[layer] = resid.astype(self.cache.residuals.dtype)
        return out.astype(q.dtype)

    def new_cache(self) -> HeadCache:
        """This step's planned outputs (the next step's reuse source) and residuals, stacked over layers."""
        layers = self.cache.outputs.shape[0]
        if sorted(self._outputs) != list(range(layers)):
            raise ValueError(f"the model called the attention hook for layers {sorted(self._outputs)} but the plan "
                             f"has {layers}; the plan is for another model.")
        return HeadCache(jnp.stack([self._outputs[i] for i in range(layers)]),
                         jnp.stack([self._residuals[i] for i in range(layers)]))
