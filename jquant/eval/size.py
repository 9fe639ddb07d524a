"""``size_report(model)``: parameters, stored bytes and bits per parameter, overall and per site.

Logical parameters count the elements of the original tensors (a ``QArray``
counts its logical shape, not its packed codes); stored bytes count every
array actually kept, quantization metadata included (``QArray.nbytes``). Tables that
a format shares across tensors instead of storing them (PCDVQ's data-free codebooks,
``shared_table_bytes``) are counted once per model, as one row per distinct table.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jquant.eval.report import param_bytes
from jquant.formats import QArray


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Totals and per-tensor rows ``(path, parameters, bytes, format)``."""

    parameters: int
    bytes: int
    rows: list[tuple[str, int, int, str]]

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes / self.parameters

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


def size_report(model: nnx.Module) -> SizeReport:
    """Size of every parameter of ``model`` (see the module docstring for what is counted)."""
    rows, shared = [], {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        name = "/".join(str(p) for p in path)
        if isinstance(value, QArray):
            rows.append((name, value.size, value.nbytes, value.format.name))
            if hasattr(value.format, "shared_table_bytes"):
                table = f"shared codebooks d{value.format.vector_dim}-a{value.format.direction_bits}-b{value.format.magnitude_bits}"
                shared[table] = value.format.shared_table_bytes
        else:
            rows.append((name, math.prod(value.shape), param_bytes(value), str(value.dtype)))
    rows += [(table, 0, nbytes, "codebook") for table, nbytes in shared.items()]
    return SizeReport(parameters=sum(r[1] for r in rows), bytes=sum(r[2] for r in rows), rows=rows)
