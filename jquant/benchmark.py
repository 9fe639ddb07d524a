"""Kernel benchmarks: every quantized matmul path against a bf16 ``jnp.dot`` measured in the same run.

``jquant bench`` and ``experiments/bench_kernels.py`` call ``run_benchmark``. For each
case (a weight format, an optional activation format and a Pallas kernel) and each
real layer shape ``(K, N)`` and batch ``M`` it times

- ``bf16``: ``jnp.dot(x, w)`` with bf16 ``x [M, K]`` and ``w [K, N]``;
- ``xla``: the XLA fallback of ``jquant.ops.linear`` (dequantize, fake-quantize, dot);
- ``pallas``: the Pallas kernel with the best tile config found by ``tune``;
- ``native`` (W8A8 cases): XLA's own int8/fp8 GEMM (``xla_native_dot``).

Timing: a ``jit`` runs the op on ``copies`` distinct weight sets back to back (enough
copies that they do not fit in L2, so decode reads come from HBM), and a second jit
runs that list twice; the difference of their median wall-clock times over ``reps``
runs, divided by ``copies``, is the time per call. The difference removes the fixed
cost of dispatching a jit (tens of microseconds) but keeps the launch gaps between
kernels that a real model also sees between layers.
Ceilings (HBM bandwidth from a large device copy, bf16 matmul rate from an
8192^3 ``jnp.dot``) are measured in the same run; "roofline fraction" is
``max(bytes / bandwidth, flops / rate) / time`` with int8/fp8 dots at 2x the bf16 rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import get_format, quantize
from jquant.ops.linear import linear
from jquant.pallas_kernels import registry
from jquant.pallas_kernels._common import TileConfig

SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
M_VALUES: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192)
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES


@dataclasses.dataclass(frozen=True)
class Case:
    """One quantized matmul path to benchmark."""

    name: str
    weight: str
    activation: str | None
    kernel: str
    dot_rate: float = 1.0  # tensor-core rate relative to bf16
    native: bool = False  # also time XLA's native low-precision GEMM


CASES: tuple[Case, ...] = (
    Case("w4a16-int4-g128", "int4-g128", None, "pallas-weight-only-int"),
    Case("w8a16-int8", "int8", None, "pallas-weight-only-int"),
    Case("w4a16-nvfp4", "nvfp4", None, "pallas-weight-only-fp4"),
    Case("w4a16-mxfp4", "mxfp4", None, "pallas-weight-only-fp4"),
    Case("w8a8-int8", "int8", "int8", "pallas-int8-activation", 2.0, native=True),
    Case("w4a8-int4-g128", "int4-g128", "int8", "pallas-int8-activation", 2.0),
    Case("w8a8-fp8", "fp8-e4m3", "fp8-e4m3", "pallas-fp8", 2.0, native=True),
)


def median_time(fn: Callable, args, reps: int) -> float:
    """Median wall-clock seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_per_call(op: Callable, x: jax.Array, weights: Sequence, reps: int) -> float:
    """Seconds per ``op(x, w)``, free of the fixed cost of dispatching a jit.

    Two jits run the op over ``weights`` back to back, once and twice over (the second
    pass on a permuted ``x``); the
    difference of their median times is the time of ``len(weights)`` calls.
    """
    once = jax.jit(lambda x, x2, ws: [op(x, w) for w in ws])
    twice = jax.jit(lambda x, x2, ws: [op(x, w) for w in ws] + [op(x2, w) for w in ws])
    args = (x, x[::-1], list(weights))  # a second input, so XLA cannot merge the two passes
    t1, t2 = median_time(once, args, reps), median_time(twice, args, reps)
    return max(t2 - t1, 1e-9) / len(weights)


def copies_for(weight_bytes: int, m: int) -> int:
    """Distinct weight sets so that one pass does not fit in L2 (2 when compute bound)."""
    if m >= 1024:
        return 2
    return int(min(16, max(2, math.ceil(ROTATE_BYTES / max(weight_bytes, 1)))))


def measure_ceilings(reps: int = 10) -> dict[str, float]:
    """HBM bandwidth (bytes read + written per second) and bf16 matmul rate (flop/s) of this device."""
    gpu = jax.default_backend() == "gpu"
    n = 512 * 2**20 if gpu else 2**24  # 1 GiB of float16 on a GPU
    a = jnp.ones((n,), jnp.float16) * 1.5
    copy = jax.jit(lambda a: a * 1.0009765625)
    t = median_time(copy, (a,), reps)
    bw = 2 * n * 2 / t
    d = 8192 if gpu else 1024
    x = jax.random.normal(jax.random.PRNGKey(0), (d, d), jnp.bfloat16)
    y = jax.random.normal(jax.random.PRNGKey(1), (d, d), jnp.bfloat16)
    t = median_time(jax.jit(jnp.dot), (x, y), reps)
    return {"hbm_bytes_per_s": bw, "bf16_flops_per_s": 2 * d**3 / t}


def weight_sets(case: Case | None, k: int, n: int, count: int, key: jax.Array) -> list:
    """``count`` distinct weights: bf16 arrays (``case=None``) or QArrays of ``case.weight``."""
    out = []
    for i in range(count):
        w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * 0.02
        out.append(w.astype(jnp.bfloat16) if case is None else quantize(w, case.weight, axis=0))
    return jax.block_until_ready(out)


def nbytes(w) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))


def xla_op(case: Case) -> Callable:
    act = None if case.activation is None else get_format(case.activation)
    return lambda x, w: linear(x, w, activation=act)


def kernel_op(case: Case, cfg: TileConfig, kernel: str | None = None) -> Callable:
    act = None if case.activation is None else get_format(case.activation)
    run = registry.get(kernel or case.kernel).run
    return lambda x, w: run(x, w, act, cfg)


def first_fitting(kernel: str, x: jax.Array, w, activation, configs) -> TileConfig | None:
    """The first of ``configs`` that the kernel accepts for these operands."""
    for cfg in configs:
        try:
            registry.get(kernel).check(x, w, activation, cfg)
        except ValueError:
            continue
        return cfg
    return None


def roofline_seconds(case: Case | None, w, m: int, k: int, n: int, ceilings: dict) -> float:
    bytes_moved = nbytes(w) + m * k * 2 + m * n * 2
    rate = ceilings["bf16_flops_per_s"] * (1.0 if case is None else case.dot_rate)
    return max(bytes_moved / ceilings["hbm_bytes_per_s"], 2 * m * n * k / rate)


@dataclasses.dataclass
class Row:
    case: str
    path: str
    k: int
    n: int
    m: int
    seconds: float
    roofline_fraction: float
    tb_per_s: float
    tflop_per_s: float
    vs_bf16: float
    config: dict | None = None


def tune(case: Case, k: int, n: int, m: int, key: jax.Array, reps: int = 5,
         log: Callable[[str], None] = print) -> tuple[TileConfig, float]:
    """Best ``TileConfig`` (and its seconds per call) among the registry's candidates for ``m``."""
    w0 = weight_sets(case, k, n, 1, key)[0]
    weights = weight_sets(case, k, n, copies_for(nbytes(w0), m), key)
    x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.bfloat16)
    best = None
    for cfg in registry.candidate_configs(case.kernel, m):
        try:
            registry.get(case.kernel).check(x, weights[0], None if case.activation is None
                                            else get_format(case.activation), cfg)
        except ValueError:
            continue
        t = time_per_call(kernel_op(case, cfg), x, weights, reps)
        log(f"  tune {case.name} K={k} N={n} M={m} {cfg} -> {t * 1e6:.1f} us")
        if best is None or t < best[1]:
            best = (cfg, t)
    if best is None:
        raise ValueError(f"no candidate tile config fits {case.name} at K={k} N={n} M={m}.")
    return best


def run_benchmark(cases: Sequence[Case] = CASES, shapes: Sequence[tuple[int, int]] = SHAPES,
                  m_values: Sequence[int] = M_VALUES, configs: dict | None = None, reps: int = 5,
                  with_xla: bool = True, log: Callable[[str], None] = print,
                  ceilings: dict | None = None) -> dict:
    """Times bf16, the XLA fallback and each kernel; returns ``{"device", "jax", "ceilings", "rows"}``.

    ``configs`` maps ``(case name, m)`` to a ``TileConfig``; missing entries use the
    registry's default config for ``m``.
    """
    key = jax.random.PRNGKey(0)
    ceilings = ceilings or measure_ceilings()
    log(f"ceilings: {ceilings['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"{ceilings['bf16_flops_per_s'] / 1e12:.0f} bf16 TFLOP/s")
    rows: list[Row] = []

    def add(case, path, w, k, n, m, t, base, cfg=None):
        bytes_moved = nbytes(w) + m * k * 2 + m * n * 2
        rows.append(Row(case, path, k, n, m, t, roofline_seconds(
            None if path == "bf16" else next(c for c in cases if c.name == case), w, m, k, n, ceilings) / t,
            bytes_moved / t / 1e12, 2 * m * n * k / t / 1e12, base / t,
            None if cfg is None else cfg.as_dict()))
        log(f"{case:18s} {path:8s} K={k:5d} N={n:5d} M={m:5d} {t * 1e6:9.1f} us  x{base / t:5.2f} vs bf16")

    for k, n in shapes:
        for m in m_values:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            wb = weight_sets(None, k, n, copies_for(k * n * 2, m), key)
            base = time_per_call(jnp.dot, x, wb, reps)
            add("bf16", "bf16", wb[0], k, n, m, base, base)
            del wb
            for case in cases:
                w0 = weight_sets(case, k, n, 1, key)[0]
                ws = weight_sets(case, k, n, copies_for(nbytes(w0), m), key)
                if with_xla:
                    add(case.name, "xla", ws[0], k, n, m, time_per_call(xla_op(case), x, ws, reps), base)
                act = None if case.activation is None else get_format(case.activation)
                tuned = (configs or {}).get((case.name, m))
                cfg = first_fitting(case.kernel, x, ws[0], act, [tuned] if tuned else
                                    registry.candidate_configs(case.kernel, m))
                if cfg is None:
                    log(f"{case.name}: no tile config fits K={k} N={n} M={m}; skipped")
                    continue
                add(case.name, "pallas", ws[0], k, n, m,
                    time_per_call(kernel_op(case, cfg), x, ws, reps), base, cfg)
                if case.native:
                    add(case.name, "native", ws[0], k, n, m, time_per_call(
                        kernel_op(case, cfg, registry.NATIVE), x, ws, reps), base)
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceilings,
            "rows": [dataclasses.asdict(r) for r in rows]}


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: np.asarray(o).tolist())
