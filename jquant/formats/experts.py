"""Stacked expert weights ``[E, in, out]``: per-expert QArrays stacked into one, and mixed-precision partitions.

``stack_experts([q_0, .., q_{E-1}])`` turns ``E`` QArrays of one format, each ``[in, out]`` quantized along
axis 0, into one ``[E, in, out]`` QArray quantized along axis 1 (every scale stays the expert's own).

``ExpertPartition`` holds an expert stack whose experts use different formats (MxMoE's per-expert
allocation): ``parts[g]`` is a QArray (or a float array) ``[len(experts[g]), in, out]`` holding the experts
``experts[g]``; every expert appears in exactly one part. It is a registered pytree and NNX data type, so
it sits inside an ``nnx.Param`` like a QArray and is saved and sharded the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats.qarray import CHILDREN, QArray


def stack_experts(parts: list[QArray]) -> QArray:
    """``E`` QArrays ``[in, out]`` (same format, shape and axis 0) -> one QArray ``[E, in, out]`` along axis 1."""
    first = parts[0]
    for q in parts:
        if q.format != first.format or q.shape != first.shape or q.axis != 0 or q.ndim != 2:
            raise ValueError(f"stack_experts: every expert must be a [in, out] QArray of one format along axis 0; got "
                             f"{q.format.name} {q.shape} axis {q.axis} beside {first.format.name} {first.shape}.")
    if first.tensor_scale is not None or first.codebooks is not None:
        raise ValueError(f"stack_experts: {first.format.name} keeps a per-tensor scale or codebooks; stacked experts "
                         "need formats whose scales are per channel or per group.")
    children = {name: jnp.stack([getattr(q, name) for q in parts]) for name in CHILDREN
                if getattr(first, name) is not None}
    return QArray(**children, format=first.format, shape=(len(parts), *first.shape), dtype=first.dtype, axis=1).validate()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ExpertPartition:
    """An ``[E, in, out]`` expert stack stored in parts of different formats (see the module docstring)."""

    parts: tuple[QArray | jax.Array, ...]
    experts: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        ids = sorted(e for group in self.experts for e in group)
        if ids != list(range(len(ids))) or len(self.parts) != len(self.experts):
            raise ValueError(f"ExpertPartition: the parts must cover experts 0..E-1 exactly once, got {self.experts}.")

    @property
    def num_experts(self) -> int:
        return sum(len(group) for group in self.experts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_experts, *tuple(self.parts[0].shape)[1:])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes if isinstance(p, QArray) else int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                   for p in self.parts)

    def dequantize(self, dtype) -> jax.Array:
        """The full ``[E, in, out]`` stack in ``dtype`` (each part decoded, experts put back in order)."""
        decoded = [p.dequantize(dtype) if isinstance(p, QArray) else p.astype(dtype) for p in self.parts]
        order = np.argsort(np.concatenate([np.asarray(g, np.int64) for g in self.experts]), kind="stable")
        return jnp.concatenate(decoded, axis=0)[order]


jax.tree_util.register_dataclass(ExpertPartition, data_fields=["parts"], meta_fields=["experts"])
nnx.register_data_type(ExpertPartition)
