"""``Kernel``: a registered fast path for one op, tried by ``jquant.ops.dispatch`` before the built-in paths.

Its own module so both the dispatcher and the bridges that build kernels (``jquant.ops.pallas_path``)
import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A fast path for ``op``, tried before the built-in paths.

    ``op="linear"``: ``accepts(x, w, activation) -> bool``, ``apply(x, w, b, activation) -> y``.
    ``op="conv"``: ``accepts(x, w, geometry)``, ``apply(x, w, b, geometry)`` with ``geometry`` a
    ``jquant.ops.conv.ConvGeometry`` (``w`` the ``[k C_in / G, C_out]`` matrix, ``x`` already padded and
    activation-quantized). ``op="attention"``: ``accepts(q, k, mask)``, ``apply(q, k, v, mask, scale)`` with
    ``mask`` a ``jquant.ops.Mask`` or a dense ``[B, T, S]`` array.
    """

    name: str
    accepts: Callable[..., bool]
    apply: Callable[..., jax.Array]
    op: str = "linear"

    def __post_init__(self):
        if self.op not in ("linear", "conv", "attention"):
            raise ValueError(f"Kernel {self.name!r}: op={self.op!r}; kernels can be registered for 'linear', 'conv' "
                             "or 'attention'.")
