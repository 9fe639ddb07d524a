"""Kernel benchmarks: every quantized matmul path against a bf16 ``jnp.dot`` measured in the same run.

``jquant bench`` and ``experiments/bench_kernels.py`` call ``run_benchmark``. For each
case (a weight format, an optional activation format and the Pallas kernels that
implement it) and each real layer shape ``(K, N)`` and batch ``M`` it times

- ``bf16``: ``jnp.dot(x, w)`` with bf16 ``x [M, K]`` and ``w [K, N]``;
- ``xla``: the XLA fallback of ``jquant.ops.linear`` (dequantize, fake-quantize, dot);
- ``pallas``: the fastest Pallas kernel and tile config (every candidate of every
  kernel of the case is timed at the tuning batch sizes; other M reuse a tuned choice);
- ``native`` (W8A8 cases): XLA's own int8/fp8 GEMM (``xla_native_dot``).

Timing (``time_jobs``): each path is jitted over ``copies`` distinct weight sets, run
back to back (enough copies that they do not fit in L2, so decode reads come from
HBM). On a GPU the time is **device time**: the summed durations of the GPU kernels
the jit launched, read from a ``jax.profiler`` trace (``jquant.device_timing``), per
call; host dispatch and launch latency are excluded, gaps between the kernels of a
multi-kernel path are excluded too (the per-call span that includes them is kept as
``span_seconds``). Off-GPU (smoke runs) it is wall clock.
Ceilings (HBM bandwidth from a large device copy, bf16 matmul rate from an
8192^3 ``jnp.dot``) are measured the same way in the same run; "roofline fraction" is
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

from jquant.device_timing import time_device
from jquant.formats import CodebookFormat, QArray, get_format, quantize
from jquant.ops.dispatch import force_path
from jquant.ops.linear import linear
from jquant.pallas_kernels import registry
from jquant.pallas_kernels._common import TileConfig

SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
M_VALUES: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192)
TUNE_M: tuple[int, ...] = (1, 4, 16, 256, 4096)
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
    extra_kernels: tuple[str, ...] = ()  # further Pallas kernels competing for this case

    @property
    def kernels(self) -> tuple[str, ...]:
        return (self.kernel,) + self.extra_kernels


GEMV = "pallas-int-gemv"
CASES: tuple[Case, ...] = (
    Case("w4a16-int4-g128", "int4-g128", None, "pallas-weight-only-int", extra_kernels=(GEMV,)),
    Case("w8a16-int8", "int8", None, "pallas-weight-only-int", extra_kernels=(GEMV,)),
    Case("w4a16-nvfp4", "nvfp4", None, "pallas-weight-only-fp4"),
    Case("w4a16-mxfp4", "mxfp4", None, "pallas-weight-only-fp4"),
    Case("w8a8-int8", "int8", "int8", "pallas-int8-activation", 2.0, native=True),
    Case("w4a8-int4-g128", "int4-g128", "int8", "pallas-int8-activation", 2.0),
    Case("w8a8-fp8", "fp8-e4m3", "fp8-e4m3", "pallas-fp8", 2.0, native=True),
    Case("vq-d4-k8", "vq-d4-k8", None, "pallas-codebook-gemv"),
    Case("vq-d8-k16", "vq-d8-k16", None, "pallas-codebook-gemv"),
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


@dataclasses.dataclass
class Timing:
    seconds: float  # per call (device kernel time on a GPU, wall clock elsewhere)
    span_seconds: float
    kernels: dict[str, float]  # kernel name -> seconds per call
    method: str


def _over_weights(op: Callable) -> Callable:
    return lambda x, ws: [op(x, w) for w in ws]


def time_jobs(jobs: Sequence[tuple[Callable, jax.Array, Sequence]], reps: int,
              log: Callable[[str], None] | None = None) -> list[Timing]:
    """Seconds per ``op(x, w)`` for each ``(op, x, weights)`` job (module docstring).

    One jit per job calls ``op`` on every weight set; on a GPU all jobs are traced in
    one profiler session and the device time is divided by the number of weight sets.
    """
    timed = time_device([(_over_weights(op), (x, list(ws))) for op, x, ws in jobs], reps, log)
    if timed is not None:
        return [Timing(t.kernel_s / len(ws), t.span_s / len(ws),
                       {k: v / len(ws) for k, v in t.kernels.items()}, "device")
                for t, (_, _, ws) in zip(timed, jobs)]
    out = []
    for op, x, ws in jobs:
        t = median_time(jax.jit(_over_weights(op)), (x, list(ws)), reps) / len(ws)
        out.append(Timing(t, t, {}, "wall"))
    return out


def time_per_call(op: Callable, x: jax.Array, weights: Sequence, reps: int) -> float:
    """Seconds per ``op(x, w)`` over ``weights`` (one job of ``time_jobs``)."""
    return time_jobs([(op, x, weights)], reps)[0].seconds


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
    d = 8192 if gpu else 1024
    x = jax.random.normal(jax.random.PRNGKey(0), (d, d), jnp.bfloat16)
    y = jax.random.normal(jax.random.PRNGKey(1), (d, d), jnp.bfloat16)
    t_copy, t_dot = time_jobs([(lambda a, _: a * 1.0009765625, a, [None]),
                               (lambda x, y: jnp.dot(x, y), x, [y])], reps)
    return {"hbm_bytes_per_s": 2 * n * 2 / t_copy.seconds, "bf16_flops_per_s": 2 * d**3 / t_dot.seconds}


def random_codebook_weight(fmt: CodebookFormat, k: int, n: int, key: jax.Array) -> QArray:
    """A ``[K, N]`` codebook QArray with uniformly random indices and normal codebooks (and scales).

    For timing only: the nearest-codeword search of ``codebook_quantize`` is too slow at
    16-bit indices on layer shapes, and kernel time does not depend on the fit.
    """
    spec = fmt.expected_children((k, n), 0)
    kc, kb, ks = jax.random.split(key, 3)
    arrays = {"codes": jax.random.randint(kc, spec["codes"].shape, 0, 256, jnp.int32).astype(jnp.uint8),
              "codebooks": (jax.random.normal(kb, spec["codebooks"].shape) * 0.02).astype(spec["codebooks"].dtype)}
    if spec.get("scales") is not None:
        arrays["scales"] = (1.0 + jax.random.uniform(ks, spec["scales"].shape)).astype(spec["scales"].dtype)
    return QArray(**arrays, format=fmt, shape=(k, n), dtype="float32", axis=0).validate()


def weight_sets(case: Case | None, k: int, n: int, count: int, key: jax.Array) -> list:
    """``count`` distinct weights: bf16 arrays (``case=None``) or QArrays of ``case.weight``."""
    out = []
    for i in range(count):
        ki = jax.random.fold_in(key, i)
        fmt = None if case is None else get_format(case.weight)
        if isinstance(fmt, CodebookFormat):
            out.append(random_codebook_weight(fmt, k, n, ki))
            continue
        w = jax.random.normal(ki, (k, n), jnp.float32) * 0.02
        out.append(w.astype(jnp.bfloat16) if case is None else quantize(w, case.weight, axis=0))
    return jax.block_until_ready(out)


def nbytes(w) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))


def _activation(case: Case):
    return None if case.activation is None else get_format(case.activation)


def xla_op(case: Case) -> Callable:
    """The XLA dequantize path of ``linear`` (forced, so the dispatch table cannot pick a kernel)."""
    act = _activation(case)

    def op(x, w):
        with force_path("xla"):
            return linear(x, w, activation=act)

    return op


def kernel_op(case: Case, cfg: TileConfig | None, kernel: str | None = None) -> Callable:
    act = _activation(case)
    run = registry.get(kernel or case.kernel).run
    return lambda x, w: run(x, w, act, cfg)


def fitting(kernel: str, x: jax.Array, w, activation, configs) -> list[TileConfig]:
    """The ``configs`` that the kernel accepts for these operands."""
    out = []
    for cfg in configs:
        try:
            registry.get(kernel).check(x, w, activation, cfg)
        except ValueError:
            continue
        out.append(cfg)
    return out


def first_fitting(kernel: str, x: jax.Array, w, activation, configs) -> TileConfig | None:
    """The first of ``configs`` that the kernel accepts for these operands."""
    fits = fitting(kernel, x, w, activation, configs)
    return fits[0] if fits else None


def candidates(case: Case, x: jax.Array, w, tune: bool) -> list[tuple[str, TileConfig]]:
    """``(kernel, config)`` pairs to time: every fitting candidate (``tune``) or each kernel's first.

    With ``extra_kernels``, only those are tuned; the case's general kernel keeps its first config.
    """
    act, m = _activation(case), x.shape[0]
    out = []
    for kernel in case.kernels:
        fits = fitting(kernel, x, w, act, registry.candidate_configs(kernel, m))
        full = tune and (not case.extra_kernels or kernel != case.kernel)
        out += [(kernel, cfg) for cfg in (fits if full else fits[:1])]
    return out


def relative_error(case: Case, kernel: str, cfg: TileConfig | None, x: jax.Array, w) -> float:
    """``|y - ref| / |ref|`` of one kernel call against its float32 reference (NaN stays NaN)."""
    act, spec = _activation(case), registry.get(kernel)
    y = spec.run(x, w, act, cfg).astype(jnp.float32)
    ref = spec.reference(x.astype(jnp.float32), w, act)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


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
    kernel: str | None = None
    span_seconds: float | None = None
    kernels: dict | None = None
    method: str = "device"


def tuned_choice(tuned: dict, case: str, k: int, n: int, m: int) -> tuple[str, TileConfig] | None:
    """The (kernel, config) tuned for ``case`` on shape ``(k, n)`` at the smallest tuned M >= m.

    ``tuned`` maps ``(case, k, n, m)`` to ``(kernel, config)``; the largest tuned M is used
    beyond it.
    """
    ms = sorted(mm for (c, kk, nn, mm) in tuned if (c, kk, nn) == (case, k, n))
    if not ms:
        return None
    larger = [mm for mm in ms if mm >= m]
    return tuned[(case, k, n, min(larger) if larger else max(ms))]


def run_benchmark(cases: Sequence[Case] = CASES, shapes: Sequence[tuple[int, int]] = SHAPES,
                  m_values: Sequence[int] = M_VALUES, configs: dict | None = None, reps: int = 5,
                  with_xla: bool = True, log: Callable[[str], None] = print,
                  ceilings: dict | None = None, tune_m: Sequence[int] = TUNE_M, check: bool = True) -> dict:
    """Times bf16, the XLA fallback and each kernel; returns ``{"device", "jax", "ceilings", "rows", "tuned"}``.

    At each M of ``tune_m`` (and at any M below the smallest of them) every fitting
    candidate config of every kernel of a case is timed and the fastest is reported;
    other M reuse the choice tuned at the nearest larger tuned M. ``configs`` (``(case
    name, m)`` -> ``TileConfig``) pins the general kernel's config instead. With ``check``,
    every timed kernel's output on the first weight set is compared with its float32
    reference and a candidate off by more than 2e-2 (relative) is dropped.
    """
    key = jax.random.PRNGKey(0)
    ceilings = ceilings or measure_ceilings()
    log(f"ceilings: {ceilings['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"{ceilings['bf16_flops_per_s'] / 1e12:.0f} bf16 TFLOP/s")
    rows: list[Row] = []
    tuned: dict = {}
    by_name = {c.name: c for c in cases}

    def add(case, path, w, k, n, m, t: Timing, base, kernel=None, cfg=None):
        bytes_moved = nbytes(w) + m * k * 2 + m * n * 2
        rows.append(Row(case, path, k, n, m, t.seconds, roofline_seconds(
            None if path == "bf16" else by_name[case], w, m, k, n, ceilings) / t.seconds,
            bytes_moved / t.seconds / 1e12, 2 * m * n * k / t.seconds / 1e12, base / t.seconds,
            None if cfg is None else cfg.as_dict(), kernel, t.span_seconds, t.kernels, t.method))
        log(f"{case:18s} {path:8s} K={k:5d} N={n:5d} M={m:5d} {t.seconds * 1e6:9.1f} us  "
            f"x{base / t.seconds:5.2f} vs bf16" + (f"  {kernel} {cfg}" if kernel else ""))

    for k, n in shapes:
        order = sorted(m_values, key=lambda mm: (mm not in tune_m and mm >= min(tune_m, default=0), mm))
        for m in order:  # tuned M first, so the others can reuse their choice
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            wb = weight_sets(None, k, n, copies_for(k * n * 2, m), key)
            jobs, meta = [(lambda x, w: jnp.dot(x, w), x, wb)], [("bf16", "bf16", wb[0], None, None)]
            for case in cases:
                w0 = weight_sets(case, k, n, 1, key)[0]
                ws = weight_sets(case, k, n, copies_for(nbytes(w0), m), key)
                if with_xla:
                    jobs.append((xla_op(case), x, ws))
                    meta.append((case.name, "xla", ws[0], None, None))
                pinned = (configs or {}).get((case.name, m))
                if pinned is not None:
                    cands = [(case.kernel, pinned)]
                elif m in tune_m or m < min(tune_m, default=0):
                    cands = candidates(case, x, ws[0], tune=True)
                else:
                    choice = tuned_choice(tuned, case.name, k, n, m)
                    cands = [choice] if choice and fitting(choice[0], x, ws[0], _activation(case), [choice[1]]) \
                        else candidates(case, x, ws[0], tune=False)
                if not cands:
                    log(f"{case.name}: no kernel config fits K={k} N={n} M={m}; skipped")
                for kernel, cfg in cands:
                    jobs.append((kernel_op(case, cfg, kernel), x, ws))
                    meta.append((case.name, "pallas", ws[0], kernel, cfg))
                if case.native:
                    jobs.append((kernel_op(case, None, registry.NATIVE), x, ws))
                    meta.append((case.name, "native", ws[0], None, None))
            try:
                times = time_jobs(jobs, reps, log)
            except Exception as e:  # noqa: BLE001 - one failing compile must not lose the sweep
                log(f"K={k} N={n} M={m}: timing failed ({type(e).__name__}: {str(e)[:300]}); "
                    f"retrying job by job")
                times = []
                for job in jobs:
                    try:
                        times.append(time_jobs([job], reps, log)[0])
                    except Exception as e2:  # noqa: BLE001
                        log(f"  job failed: {type(e2).__name__}: {str(e2)[:200]}")
                        times.append(Timing(float("nan"), float("nan"), {}, "failed"))
            base = times[0].seconds
            best: dict = {}
            for (case, path, w, kernel, cfg), t in zip(meta, times):
                if not t.seconds == t.seconds:  # NaN: failed or unattributed
                    continue
                if path in ("pallas", "native") and check:
                    err = relative_error(by_name[case], kernel or registry.NATIVE, cfg, x, w)
                    if not err <= 2e-2:
                        log(f"  WRONG {case} {kernel} {cfg}: relative error {err:.2e}; not used")
                        continue
                if path == "pallas":
                    if case not in best or t.seconds < best[case][0].seconds:
                        best[case] = (t, w, kernel, cfg)
                    if len([mm for mm in meta if mm[0] == case and mm[1] == "pallas"]) > 1:
                        log(f"  tune {case} K={k} N={n} M={m} {kernel} {cfg} -> {t.seconds * 1e6:.1f} us")
                    continue
                add(case, path, w, k, n, m, t, base)
            for case, (t, w, kernel, cfg) in best.items():
                add(case, "pallas", w, k, n, m, t, base, kernel, cfg)
                if m in tune_m:
                    tuned[(case, k, n, m)] = (kernel, cfg)
            del jobs, meta, wb
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceilings,
            "rows": [dataclasses.asdict(r) for r in rows],
            "tuned": {f"{c}|{k}x{n}|{m}": {"kernel": kern, "config": cfg.as_dict()}
                      for (c, k, n, m), (kern, cfg) in tuned.items()}}


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: np.asarray(o).tolist())
