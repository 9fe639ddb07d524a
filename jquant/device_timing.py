"""Device-side timing of jitted functions: GPU kernel time read from a profiler trace.

Wall-clock timing of one jit includes host dispatch and launch latency (10 to 30 us on
an H100 at decode sizes, as much as the kernels themselves), which squeezes small-M
speed-ups toward 1. Here each function runs under ``jax.profiler`` and its time is the
sum of the durations of the GPU kernels it launched, attributed through the
``hlo_module`` stat that XLA attaches to every kernel event (``jit_<function name>``).
Gaps between kernels are not counted; the module span (first kernel start to last
kernel end per run) is reported beside it, which does count them.

``time_device(jobs, reps)`` traces many functions in one profiler session: each job
is compiled and warmed up first, then every job runs ``reps`` times inside the trace.
It returns ``None`` when the trace holds no GPU device plane (CPU backends), so callers
can fall back to wall clock.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import itertools
import os
import re
import tempfile
from collections.abc import Callable, Sequence

import jax

_tags = itertools.count()
DERIVED_LINES = {"XLA Ops", "XLA Modules", "Steps", "TensorFlow Ops", "Framework Ops", "Source code",
                 "Launch Stats", "TensorFlow Name Scope", "Framework Name Scope"}


@dataclasses.dataclass
class DeviceTime:
    """Per-run device time of one job (seconds) and its kernels (name -> seconds per run)."""

    kernel_s: float
    span_s: float
    kernels: dict[str, float]
    launches: int  # kernels per run


def tagged_jit(fn: Callable) -> tuple[Callable, str]:
    """``jax.jit`` of ``fn`` under a unique name; returns ``(jitted, hlo module name)``."""
    tag = f"jqb{next(_tags)}z"

    def wrapped(*args):
        return fn(*args)

    wrapped.__name__ = wrapped.__qualname__ = tag
    return jax.jit(wrapped), f"jit_{tag}"


def _device_events(path: str) -> dict[str, list[tuple[int, int, str]]]:
    """``{hlo_module: [(start_ns, duration_ns, kernel name), ...]}`` over GPU kernel lines."""
    data = jax.profiler.ProfileData.from_file(path)
    out: dict[str, set] = collections.defaultdict(set)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name in DERIVED_LINES:
                continue
            for ev in line.events:
                module = None
                for key, value in ev.stats:
                    if key == "hlo_module":
                        module = str(value)
                        break
                if module is not None:
                    out[module].add((int(ev.start_ns), int(ev.duration_ns), ev.name))
    return {k: sorted(v) for k, v in out.items()}


def _runs(events: list[tuple[int, int, str]], reps: int) -> list[list[tuple[int, int, str]]]:
    """Splits a module's kernel events into ``reps`` runs at the ``reps - 1`` widest gaps."""
    if reps <= 1 or len(events) < reps:
        return [events]
    gaps = sorted(range(1, len(events)), key=lambda i: events[i][0] - (events[i - 1][0] + events[i - 1][1]))
    cuts = sorted(gaps[-(reps - 1):])
    bounds = [0] + cuts + [len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:])]


def time_device(jobs: Sequence[tuple[Callable, tuple]], reps: int = 10,
                log: Callable[[str], None] | None = None) -> list[DeviceTime] | None:
    """Per-run device time of each ``(fn, args)`` job, or ``None`` without a GPU trace.

    ``kernel_s`` is the mean over the ``reps`` runs of the summed kernel durations;
    ``span_s`` the median run span (runs are told apart by the widest gaps between kernels).

    Each ``fn`` is wrapped by ``tagged_jit``; all are compiled and run once before the
    trace starts.
    """
    tagged = [(tagged_jit(fn), args) for fn, args in jobs]
    for (f, _), args in tagged:
        jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for (f, _), args in tagged:
                for _ in range(reps):
                    jax.block_until_ready(f(*args))
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        events = {}
        for p in paths:
            events.update(_device_events(p))
    if not events:
        return None
    out = []
    for (f, module), _ in tagged:
        evs = events.get(module, [])
        if not evs:
            if log:
                log(f"time_device: no kernel events for {module}; known modules: {sorted(events)[:8]}")
            out.append(DeviceTime(float("nan"), float("nan"), {}, 0))
            continue
        runs = _runs(evs, reps)
        spans = sorted(r[-1][0] + r[-1][1] - r[0][0] for r in runs)
        per_kernel: dict[str, float] = collections.defaultdict(float)
        for e in evs:
            per_kernel[_short(e[2])] += e[1] * 1e-9 / reps
        out.append(DeviceTime(sum(e[1] for e in evs) * 1e-9 / reps, spans[len(spans) // 2] * 1e-9,
                              dict(per_kernel), len(evs) // reps))
    return out


def _short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)
    return name if len(name) <= 60 else name[:57] + "..."
