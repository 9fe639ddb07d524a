"""``module_jit``: ``nnx.jit`` that leaves a module's unchanged arrays where they are.

``nnx.jit`` with flax's default graph updates returns every Variable of every module argument from the compiled
call and writes it back, and a jitted function cannot hand an input buffer back as an output without a copy: each
call copied the whole model (a model's size in memory while the caller still holds the original, e.g. ``quantize``'s
copy sharing the user's arrays, and its time in memcpy: about 45 ms per 64 MB on the 2-core CPU). Flax's simple
graph traversal (``graph_updates=False``, flax >= 0.12.6) returns only the Variables the call changed; the
functions jquant compiles over modules change none (forwards, captures, samplers) or only their trained state
(training steps), and change no module structure inside the call (which that mode refuses). An older flax without
the option (a preinstalled one, e.g. on an accelerator machine) gets plain ``nnx.jit``: the same results, with the
copies. ``tests/test_module_jit.py`` checks both halves against plain ``nnx.jit``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from flax import nnx


_SIMPLE_GRAPH = {"graph_updates": False} if "graph_updates" in inspect.signature(nnx.jit).parameters else {}


def module_jit(fun: Callable | None = None, **jit_options: Any) -> Callable:
    """``nnx.jit(fun, graph_updates=False, **jit_options)``; usable as ``@module_jit`` or
    ``@module_jit(static_argnames=...)``."""
    if fun is None:
        return functools.partial(module_jit, **jit_options)
    return nnx.jit(fun, **_SIMPLE_GRAPH, **jit_options)
