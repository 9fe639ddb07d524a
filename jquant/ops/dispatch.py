"""Where quantized matmuls pick their implementation.

``linear`` asks ``select_kernel(x, w, activation)`` for a registered kernel
that accepts the inputs (a Pallas kernel on a GPU, say); if none does, it
uses the XLA path: dequantize the weight (and fake-quantize the activation)
and run a float dot, which is correct on every backend. Kernels register with
``register_kernel`` (the kernels issue fills this); ``explain`` says which
path a call would take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

XLA_PATH = "xla-dequantize"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A fast path: ``accepts(x, w, activation) -> bool`` and ``apply(x, w, b, activation) -> y``."""

    name: str
    accepts: Callable[..., bool]
    apply: Callable[..., jax.Array]


_KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel; kernels are tried in registration order."""
    if any(k.name == kernel.name for k in _KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered.")
    _KERNELS.append(kernel)


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]


def select_kernel(x, w, activation) -> Kernel | None:
    return next((k for k in _KERNELS if k.accepts(x, w, activation)), None)


def explain(x, w, activation=None) -> str:
    """The name of the path ``linear(x, w, activation=activation)`` takes."""
    kernel = select_kernel(x, w, activation)
    return XLA_PATH if kernel is None else kernel.name
