"""Where ops pick their implementation, keyed by op.

Every op with more than one implementation asks this module at trace time; the
ops are ``"linear"``, ``"grouped_matmul"`` (stacked experts), ``"conv"`` and
``"attention"`` (``OPS``). For ``linear`` with a quantized weight,
``select_kernel(x, w, activation, activation_scale)`` chooses, in order:

1. kernels added with ``register_kernel`` for that op (user extensions), first that accepts;
2. the Pallas kernels of ``jquant.pallas_kernels`` (see ``jquant.ops.pallas_path``):
   in mode ``"auto"`` only on a GPU and only where the measured dispatch table says
   the kernel (or XLA's native int8/fp8 GEMM) beat the XLA dequantize path at this
   shape and batch; in mode ``"pallas"`` whenever a kernel supports the formats and
   the shape tiles (interpret mode off-GPU: slow, for tests);
3. otherwise the XLA path: dequantize the weight (fake-quantize the activation) and
   run a float dot, which is correct on every backend.

``conv`` (quantized weight) and ``attention`` (every call) try their registered kernels
(``select_conv`` / ``select_attention``) and otherwise take XLA: ``lax.conv_general_dilated``
on the dequantized kernel (``XLA_PATH``), and the dense masked softmax (``XLA_ATTENTION_PATH``).

The mode comes from ``force_path(mode)`` (a context manager) or the environment
variable ``JQUANT_KERNELS`` (``auto`` by default, ``xla``, ``pallas``). Decisions are
made at trace time (shapes are static), and ``record_dispatch()`` collects them (the ops
with a quantized weight by default, any ops asked for); ``explain`` says which path one
call would take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator


from jquant.ops.kernel import Kernel as Kernel

XLA_PATH = "xla-dequantize"
XLA_ATTENTION_PATH = "xla-dense-attention"
MODES = ("auto", "xla", "pallas")
OPS = ("linear", "grouped_matmul", "conv", "attention")
WEIGHT_OPS = ("linear", "grouped_matmul", "conv")
"""The ops whose records ``record_dispatch()`` collects by default (those with a quantized weight)."""
MODE_ENV = "JQUANT_KERNELS"


@dataclasses.dataclass(frozen=True)
class DispatchRecord:
    """One dispatch decision of ``op``: the path taken and why.

    ``x_shape`` / ``w_shape`` are the input and weight shapes (for attention: the query and key shapes);
    ``weight_format`` the weight's format name or dtype (attention: the keys' dtype).
    """

    path: str
    reason: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    weight_format: str
    activation_format: str | None
    op: str = "linear"


_KERNELS: list[Kernel] = []
_MODE_STACK: list[str] = []
_RECORDERS: list[tuple[list[DispatchRecord], frozenset[str]]] = []


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel for ``kernel.op``; an op's kernels are tried in registration order, before its built-in paths."""
    if any(k.name == kernel.name for k in _KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered.")
    _KERNELS.append(kernel)


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: unknown kernel mode {mode!r}; use one of {MODES}.")
    return mode


def current_mode() -> str:
    """The active mode: the innermost ``force_path``, else ``$JQUANT_KERNELS``, else ``"auto"``."""
    if _MODE_STACK:
        return _MODE_STACK[-1]
    return _check_mode(os.environ.get(MODE_ENV, "auto") or "auto", f"${MODE_ENV}")


@contextlib.contextmanager
def force_path(mode: str) -> Iterator[None]:
    """Within the block, dispatch in ``mode`` (``"auto"``, ``"xla"`` or ``"pallas"``).

    Decisions are taken when a function is traced, so re-trace (a new ``jax.jit``)
    inside the block for it to apply to jitted code.
    """
    _MODE_STACK.append(_check_mode(mode, "force_path"))
    try:
        yield
    finally:
        _MODE_STACK.pop()


@contextlib.contextmanager
def record_dispatch(ops: Iterable[str] = WEIGHT_OPS) -> Iterator[list[DispatchRecord]]:
    """Collects a ``DispatchRecord`` for every call of ``ops`` traced in the block.

    ``linear``, ``grouped_matmul`` and ``conv`` are recorded when their weight is quantized (a float
    weight has one path), ``attention`` on every call. The default collects the quantized-weight ops;
    ``record_dispatch(OPS)`` collects all of them, ``record_dispatch(("attention",))`` attention only.
    """
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"record_dispatch: unknown ops {unknown}; choose from {OPS}.")
    records: list[DispatchRecord] = []
    entry = (records, frozenset(ops))
    _RECORDERS.append(entry)
    try:
        yield records
    finally:
        _RECORDERS.remove(entry)


def _record(path: str, reason: str, x, w, activation, op: str = "linear") -> None:
    if not _RECORDERS:
        return
    rec = DispatchRecord(path, reason, tuple(x.shape), tuple(w.shape),
                         getattr(getattr(w, "format", None), "name", str(getattr(w, "dtype", ""))),
                         None if activation is None else activation.name, op)
    for records, ops in _RECORDERS:
        if op in ops:
            records.append(rec)


def _registered(op: str, *args) -> Kernel | None:
    """The first kernel registered for ``op`` that accepts ``args``."""
    return next((k for k in _KERNELS if k.op == op and k.accepts(*args)), None)


def select_kernel(x, w, activation, activation_scale=None) -> Kernel | None:
    """The fast path for ``linear(x, w, activation=...)``, or None for the XLA path."""
    from jquant.formats import QArray

    if not isinstance(w, QArray):
        return None
    mode = current_mode()
    if mode == "xla":
        _record(XLA_PATH, "mode 'xla'", x, w, activation)
        return None
    kernel = _registered("linear", x, w, activation)
    if kernel is not None:
        _record(kernel.name, "registered kernel", x, w, activation)
        return kernel
    from jquant.ops import pallas_path

    kernel, reason = pallas_path.choose(x, w, activation, activation_scale, mode)
    _record(XLA_PATH if kernel is None else kernel.name, reason, x, w, activation)
    return kernel


def select_conv(x, w, geometry) -> Kernel | None:
    """The fast path for ``conv`` of padded ``x [B, *spatial, C_in]`` with ``w`` (``[k C_in / G, C_out]``), or None
    for XLA. Only a quantized weight is recorded (a float weight has one path)."""
    from jquant.formats import QArray

    quantized = isinstance(w, QArray)
    kernel = None if current_mode() == "xla" else _registered("conv", x, w, geometry)
    if quantized:
        reason = "registered kernel" if kernel is not None else (
            "mode 'xla'" if current_mode() == "xla" else "no conv kernel accepts it: dequantize + conv_general_dilated")
        _record(XLA_PATH if kernel is None else kernel.name, reason, x, w, None, op="conv")
    return kernel


def select_attention(q, k, mask) -> Kernel | None:
    """The fast path for ``attention(q [B, T, H, D], k [B, S, K, D], ..., mask)``, or None for the dense XLA
    softmax; every call is recorded."""
    kernel = None if current_mode() == "xla" else _registered("attention", q, k, mask)
    reason = "registered kernel" if kernel is not None else (
        "mode 'xla'" if current_mode() == "xla" else f"no attention kernel accepts it: dense {_mask_name(mask)} mask")
    _record(XLA_ATTENTION_PATH if kernel is None else kernel.name, reason, q, k, None, op="attention")
    return kernel


def _mask_name(mask) -> str:
    return type(mask).__name__ if hasattr(mask, "dense") else "array"


def explain(x, w, activation=None, activation_scale=None, *, op: str = "linear", geometry=None, mask=None) -> str:
    """The name of the path one call of ``op`` takes.

    ``op="linear"``: ``linear(x, w, activation=activation, activation_scale=...)``; ``op="conv"``: ``conv`` of padded
    ``x`` with the matrix ``w`` and ``geometry`` (``jquant.ops.conv.ConvGeometry``); ``op="attention"``: ``x`` the
    query ``[B, T, H, D]``, ``w`` the key ``[B, S, K, D]`` and ``mask``.
    """
    if op == "linear":
        kernel = select_kernel(x, w, activation, activation_scale)
        return XLA_PATH if kernel is None else kernel.name
    if op == "conv":
        kernel = select_conv(x, w, geometry)
        return XLA_PATH if kernel is None else kernel.name
    if op == "attention":
        kernel = select_attention(x, w, mask)
        return XLA_ATTENTION_PATH if kernel is None else kernel.name
    raise ValueError(f"explain: op={op!r}; choose 'linear', 'conv' or 'attention' (grouped_matmul decides inside "
                     "jquant.ops.grouped_matmul; record it with record_dispatch).")
