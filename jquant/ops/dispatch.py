"""Where quantized matmuls pick their implementation.

``linear`` asks ``select_kernel(x, w, activation, activation_scale)`` for a fast
path. The choice, in order:

1. kernels added with ``register_kernel`` (user extensions), first that accepts;
2. the Pallas kernels of ``jquant.pallas_kernels`` (see ``jquant.ops.pallas_path``):
   in mode ``"auto"`` only on a GPU and only where the measured dispatch table says
   the kernel (or XLA's native int8/fp8 GEMM) beat the XLA dequantize path at this
   shape and batch; in mode ``"pallas"`` whenever a kernel supports the formats and
   the shape tiles (interpret mode off-GPU: slow, for tests);
3. otherwise the XLA path: dequantize the weight (fake-quantize the activation) and
   run a float dot, which is correct on every backend.

The mode comes from ``force_path(mode)`` (a context manager) or the environment
variable ``JQUANT_KERNELS`` (``auto`` by default, ``xla``, ``pallas``). Decisions are
made at trace time (shapes are static), and ``record_dispatch()`` collects them;
``explain`` says which path one call would take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator

import jax

XLA_PATH = "xla-dequantize"
MODES = ("auto", "xla", "pallas")
MODE_ENV = "JQUANT_KERNELS"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A fast path: ``accepts(x, w, activation) -> bool`` and ``apply(x, w, b, activation) -> y``."""

    name: str
    accepts: Callable[..., bool]
    apply: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class DispatchRecord:
    """One dispatch decision: the path taken and why."""

    path: str
    reason: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    weight_format: str
    activation_format: str | None


_KERNELS: list[Kernel] = []
_MODE_STACK: list[str] = []
_RECORDERS: list[list[DispatchRecord]] = []


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel; kernels are tried in registration order, before the Pallas kernels."""
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
def record_dispatch() -> Iterator[list[DispatchRecord]]:
    """Collects a ``DispatchRecord`` for every quantized ``linear`` traced in the block."""
    records: list[DispatchRecord] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


def _record(path: str, reason: str, x, w, activation) -> None:
    if not _RECORDERS:
        return
    rec = DispatchRecord(path, reason, tuple(x.shape), tuple(w.shape),
                         getattr(getattr(w, "format", None), "name", str(getattr(w, "dtype", ""))),
                         None if activation is None else activation.name)
    for records in _RECORDERS:
        records.append(rec)


def select_kernel(x, w, activation, activation_scale=None) -> Kernel | None:
    """The fast path for ``linear(x, w, activation=...)``, or None for the XLA path."""
    from jquant.formats import QArray

    if not isinstance(w, QArray):
        return None
    mode = current_mode()
    if mode == "xla":
        _record(XLA_PATH, "mode 'xla'", x, w, activation)
        return None
    kernel = next((k for k in _KERNELS if k.accepts(x, w, activation)), None)
    if kernel is not None:
        _record(kernel.name, "registered kernel", x, w, activation)
        return kernel
    from jquant.ops import pallas_path

    kernel, reason = pallas_path.choose(x, w, activation, activation_scale, mode)
    _record(XLA_PATH if kernel is None else kernel.name, reason, x, w, activation)
    return kernel


def explain(x, w, activation=None, activation_scale=None) -> str:
    """The name of the path ``linear(x, w, activation=activation)`` takes."""
    kernel = select_kernel(x, w, activation, activation_scale)
    return XLA_PATH if kernel is None else kernel.name
