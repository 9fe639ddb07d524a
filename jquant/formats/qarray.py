"""``QArray``: the one quantized-tensor type of jquant, and the ``Format`` protocol.

A ``QArray`` is a registered pytree. Array children (``None`` when unused):

- ``codes``        the stored payload (packed sub-byte codes as uint8, int8 codes, or
                   native float8 codes);
- ``scales``       per-group scales (float16/bfloat16/float32 values, or uint8 scale
                   bytes: UE4M3 for NVFP4, E8M0 for MX; int8 exponents for GSE-INT);
- ``zeros``        integer zero points (asymmetric integers), uint8; or the float offsets of
                   min-max formats (``minmax``: the KV caches), in their metadata dtype;
- ``tensor_scale`` one per-tensor value (NVFP4's float32 s_t; GSE-INT's int32 exponent
                   offset when the exponent field is narrowed);
- ``codebooks``    lookup tables of codebook formats.

Static metadata: ``format`` (a frozen, hashable ``Format``), ``shape`` (logical shape),
``dtype`` (name of the original dtype, the default of ``dequantize``), ``axis`` (the
non-negative contraction axis along which groups/blocks run and codes are packed).

Invariants (checked by ``validate``): every child except ``codebooks`` has the logical
rank. Reduced axes have size 1, the grouped axis has ``n // group`` entries, and the
packed axis of ``codes`` has the packed length; the format states the exact shapes and
dtypes (``Format.expected_children``). So children can be sharded with a
``PartitionSpec`` of the logical rank (``QArray.partition_specs``).

Validation runs in the constructors (``quantize``, ``codebook_quantize``) and on request
(``q.validate()``); it is not run in ``__post_init__`` because JAX rebuilds pytrees
with non-array leaves (shardings, specs, tracers of other shapes) during transforms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CHILDREN = ("codes", "scales", "zeros", "tensor_scale", "codebooks")


class Format:
    """Base class of format descriptors (frozen, keyword-only dataclasses).

    Subclasses implement:

    - ``name`` (property): a readable name, e.g. ``"int4-g128"``;
    - ``check_shape(shape, axis)``: raise ``ValueError`` when the format cannot hold
      an array of ``shape`` quantized along ``axis``;
    - ``expected_children(shape, axis, codebooks_shape=None) -> dict[str, ShapeDtypeStruct | None]``
      (``codebooks_shape`` lets codebook formats take the codebook grid from the QArray);
    - ``encode(x, axis, key) -> QArray`` (``axis`` already normalised);
    - ``decode(q) -> float32 array`` of the logical shape;
    - ``codes_of(q)``: the unpacked codes at the logical shape;
    - ``value_range(q) -> (lo, hi)``: the representable interval of every element,
      broadcastable to the logical shape (used by the clipped straight-through estimator).
    """

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, ...], axis: int) -> None:
        pass

    def expected_children(self, shape, axis, codebooks_shape=None
                          ) -> dict[str, jax.ShapeDtypeStruct | None]:
        raise NotImplementedError

    def encode(self, x: jax.Array, axis: int, key: jax.Array | None) -> "QArray":
        raise NotImplementedError

    def decode(self, q: "QArray") -> jax.Array:
        raise NotImplementedError

    def codes_of(self, q: "QArray") -> jax.Array:
        raise NotImplementedError

    def value_range(self, q: "QArray") -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError(f"{self.name}: no representable range is defined.")

    def __str__(self) -> str:
        return self.name


def _nbytes(a: Any) -> int:
    return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def _sds(a) -> str:
    return f"{tuple(a.shape)} {np.dtype(a.dtype).name}"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class QArray:
    """A quantized tensor: stored arrays plus static format metadata (see module doc)."""

    codes: jax.Array
    scales: jax.Array | None = None
    zeros: jax.Array | None = None
    tensor_scale: jax.Array | None = None
    codebooks: jax.Array | None = None
    format: Format = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    axis: int = dataclasses.field(default=0, metadata=dict(static=True))

    # -- sizes -----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of logical elements."""
        return math.prod(self.shape)

    def arrays(self) -> dict[str, Any]:
        """The non-``None`` array children by name."""
        return {k: getattr(self, k) for k in CHILDREN if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (codes, scales, zeros, tensor scale, codebooks)."""
        return sum(_nbytes(a) for a in self.arrays().values())

    @property
    def bits_per_element(self) -> float:
        """``8 * nbytes / size``: honest storage cost including all scale data."""
        return 8.0 * self.nbytes / self.size

    # -- conversion ------------------------------------------------------------------
    def dequantize(self, dtype=None) -> jax.Array:
        """Same as ``jquant.formats.dequantize(self, dtype)``."""
        from jquant.formats.api import dequantize  # api imports this module

        return dequantize(self, dtype)

    # -- checks ----------------------------------------------------------------------
    def validate(self) -> "QArray":
        """Checks metadata and every child's shape and dtype against the format.

        Returns ``self`` so that constructors can ``return QArray(...).validate()``.
        """
        if not isinstance(self.format, Format):
            raise TypeError(f"QArray.format must be a jquant Format, got {self.format!r}.")
        if not isinstance(self.shape, tuple) or not all(
                isinstance(d, (int, np.integer)) and d >= 0 for d in self.shape):
            raise TypeError(f"QArray.shape must be a tuple of non-negative ints, got {self.shape!r}.")
        if not self.shape:
            raise ValueError("QArray.shape: a QArray must have rank >= 1.")
        if not isinstance(self.axis, int) or not 0 <= self.axis < len(self.shape):
            raise ValueError(
                f"QArray.axis must be a non-negative int below the rank {len(self.shape)}, "
                f"got {self.axis!r}.")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"QArray.dtype must name a floating dtype, got {self.dtype!r}.")
        self.format.check_shape(self.shape, self.axis)
        cb_shape = None if self.codebooks is None else tuple(self.codebooks.shape)
        expected = self.format.expected_children(self.shape, self.axis, cb_shape)
        for name in CHILDREN:
            got, want = getattr(self, name), expected.get(name)
            fmt = f"{self.format.name} on shape {self.shape} (axis {self.axis})"
            if want is None and got is not None:
                raise ValueError(f"QArray.{name} must be None for {fmt}, got {_sds(got)}.")
            if want is not None and got is None:
                raise ValueError(f"QArray.{name} is missing: {fmt} stores {_sds(want)}.")
            if want is not None and (tuple(got.shape) != tuple(want.shape)
                                     or np.dtype(got.dtype) != np.dtype(want.dtype)):
                raise ValueError(
                    f"QArray.{name} is {_sds(got)} but {fmt} expects {_sds(want)}.")
        return self

    # -- sharding --------------------------------------------------------------------
    def partition_specs(self, spec: jax.sharding.PartitionSpec) -> "QArray":
        """A QArray-shaped pytree of ``PartitionSpec`` from a logical-rank ``spec``.

        Each child of the logical rank gets ``spec`` with ``None`` (replicated) on its
        size-1 (reduced) dimensions; a grouped or packed dimension keeps the mesh axis,
        so the mesh must divide its length (``n // group`` or the packed length).
        Codebooks are replicated. Use as
        ``jax.tree.map(lambda s: NamedSharding(mesh, s), q.partition_specs(spec))``.
        """
        P = jax.sharding.PartitionSpec
        entries = tuple(spec) + (None,) * (self.ndim - len(tuple(spec)))
        if len(entries) != self.ndim:
            raise ValueError(f"partition_specs: spec {spec} has more entries than rank {self.ndim}.")

        def child(a):
            if a is None:
                return None
            if a.ndim != self.ndim:
                return P()
            return P(*(e if a.shape[d] > 1 else None for d, e in enumerate(entries)))

        return dataclasses.replace(
            self, codes=child(self.codes), scales=child(self.scales), zeros=child(self.zeros),
            tensor_scale=child(self.tensor_scale),
            codebooks=None if self.codebooks is None else P())


jax.tree_util.register_dataclass(
    QArray, data_fields=list(CHILDREN), meta_fields=["format", "shape", "dtype", "axis"])
nnx.register_data_type(QArray)
