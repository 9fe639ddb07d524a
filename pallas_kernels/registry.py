"""The kernels, their tile-config candidates and the measured dispatch table.

``KERNELS`` names every matmul kernel with uniform entry points
``supports(w, activation)``, ``check(x, w, activation, cfg)``, ``run(x, w, activation, cfg)``
and ``reference(x, w, activation)``. ``dispatch_table.json`` (written by
``experiments/bench_kernels.py --write-table`` on a GPU) records, per benchmark case
and layer shape, for which batch sizes ``M`` the kernel beat the XLA dequantize path
and with which tile config; ``decide`` reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable

import jax

from jquant.formats import CodebookFormat, FP8Format, IntFormat, MXFormat, NVFP4Format, QArray

from . import (codebook_gemv, fp8_matmul, int8_activation_matmul, int_gemv, weight_only_fp4, weight_only_int,
               xla_native_dot)
from ._common import TileConfig

TABLE_PATH = os.path.join(os.path.dirname(__file__), "dispatch_table.json")
NATIVE = xla_native_dot.NAME


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    supports: Callable[[QArray, object], bool]
    check: Callable[..., None]
    run: Callable[..., jax.Array]
    reference: Callable[..., jax.Array]


KERNELS: dict[str, KernelSpec] = {
    weight_only_int.NAME: KernelSpec(
        weight_only_int.NAME,
        lambda w, a: a is None and weight_only_int.supports(w),
        lambda x, w, a, cfg: weight_only_int.check(x, w, cfg),
        lambda x, w, a, cfg: weight_only_int.weight_only_int_matmul(x, w, cfg),
        lambda x, w, a: weight_only_int.reference(x, w)),
    weight_only_fp4.NAME: KernelSpec(
        weight_only_fp4.NAME,
        lambda w, a: a is None and weight_only_fp4.supports(w),
        lambda x, w, a, cfg: weight_only_fp4.check(x, w, cfg),
        lambda x, w, a, cfg: weight_only_fp4.weight_only_fp4_matmul(x, w, cfg),
        lambda x, w, a: weight_only_fp4.reference(x, w)),
    int8_activation_matmul.NAME: KernelSpec(
        int8_activation_matmul.NAME,
        int8_activation_matmul.supports,
        int8_activation_matmul.check,
        int8_activation_matmul.int8_activation_matmul,
        int8_activation_matmul.reference),
    fp8_matmul.NAME: KernelSpec(
        fp8_matmul.NAME,
        fp8_matmul.supports,
        fp8_matmul.check,
        fp8_matmul.fp8_matmul,
        fp8_matmul.reference),
    int_gemv.NAME: KernelSpec(  # decode only (M <= 16); picked by the table, never by kernel_for
        int_gemv.NAME,
        lambda w, a: a is None and int_gemv.supports(w),
        lambda x, w, a, cfg: int_gemv.check(x, w, cfg),
        lambda x, w, a, cfg: int_gemv.int_gemv(x, w, cfg),
        lambda x, w, a: int_gemv.reference(x, w)),
    codebook_gemv.NAME: KernelSpec(  # decode only (M <= 8)
        codebook_gemv.NAME,
        lambda w, a: a is None and codebook_gemv.supports(w),
        lambda x, w, a, cfg: codebook_gemv.check(x, w, cfg),
        lambda x, w, a, cfg: codebook_gemv.codebook_gemv(x, w, cfg),
        lambda x, w, a: codebook_gemv.reference(x, w)),
    xla_native_dot.NAME: KernelSpec(
        xla_native_dot.NAME,
        xla_native_dot.supports,
        xla_native_dot.check,
        xla_native_dot.native_lowp_dot,
        xla_native_dot.reference),
}


def get(name: str) -> KernelSpec:
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(KERNELS)}.")
    return KERNELS[name]


def kernel_for(w: QArray, activation) -> KernelSpec | None:
    """The Pallas kernel that implements ``linear(x, w, activation=activation)``, if any."""
    return next((k for k in KERNELS.values() if k.name not in (NATIVE, int_gemv.NAME)
                 and k.supports(w, activation)), None)


def case_for(w: QArray, activation) -> str | None:
    """The benchmark case (``jquant.benchmark.CASES`` name) whose measurements apply to ``w``."""
    fmt = w.format
    if activation is None:
        if isinstance(fmt, IntFormat):
            return {4: "w4a16-int4-g128", 8: "w8a16-int8"}.get(fmt.bits)
        if isinstance(fmt, NVFP4Format):
            return "w4a16-nvfp4"
        if isinstance(fmt, MXFormat):
            return "w4a16-mxfp4"
        if isinstance(fmt, CodebookFormat) and fmt.name in VQ_CASES:
            return fmt.name
        return None
    if isinstance(activation, IntFormat) and isinstance(fmt, IntFormat):
        return {4: "w4a8-int4-g128", 8: "w8a8-int8"}.get(fmt.bits)
    if isinstance(activation, FP8Format) and isinstance(fmt, FP8Format):
        return "w8a8-fp8"
    return None


VQ_CASES = ("vq-d4-k8", "vq-d8-k16")  # codebook formats with a benchmark case (named as the format)


def _bucket(m: int) -> str:
    return "decode" if m <= 16 else "mid" if m < 1024 else "large"


# Last resorts that tile small layers and 32/64-element groups (K and N multiples of 32 / 64).
SMALL_DECODE = TileConfig(16, 32, 32, 1, 4, 2)
SMALL = TileConfig(64, 64, 32, 1, 4, 2)


def candidate_configs(kernel: str, m: int) -> list[TileConfig]:
    """Tile configs worth timing for batch ``m`` (the tuner picks among them)."""
    if kernel == xla_native_dot.NAME:
        return [TileConfig()]  # XLA picks its own tiling
    if kernel == int_gemv.NAME:
        return gemv_configs(m)
    if kernel == codebook_gemv.NAME:
        if m > codebook_gemv.MAX_M:
            return []
        return [TileConfig(1, bn, bk, 1, w, st) for bn, bk, w, st in
                ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (64, 128, 8, 2), (16, 128, 2, 2))]
    bucket = _bucket(m)
    weight_only = kernel in (weight_only_int.NAME, weight_only_fp4.NAME)
    if bucket == "decode":
        gemv = [TileConfig(1, bn, bk, sk, w, 3) for bn, bk, sk, w in
                ((64, 128, 4, 4), (128, 128, 4, 4), (32, 128, 8, 2), (128, 64, 8, 4))]
        dots = [TileConfig(16, bn, bk, sk, 4, st) for bn, bk, sk, st in
                ((64, 128, 4, 3), (128, 128, 4, 3), (32, 128, 4, 4))]
        return (gemv if weight_only and m == 1 else []) + dots + [SMALL_DECODE]
    if bucket == "mid":
        return [TileConfig(bm, bn, bk, 1, w, 3) for bm, bn, bk, w in
                ((64, 128, 64, 4), (128, 128, 64, 8), (64, 64, 128, 4))] + [SMALL]
    large = [TileConfig(128, bn, bk, 1, w, st) for bn, bk, w, st in
             ((128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3))]
    if not weight_only:
        large.append(TileConfig(128, 128, 64, 1, 4, 4, quantize_in_kernel=True))
    return large + [SMALL]


def gemv_configs(m: int) -> list[TileConfig]:
    """``int_gemv`` candidates: CUDA-core FMA variant (``block_m=1``) for M <= 8, tensor cores to 16."""
    fma = [TileConfig(1, bn, bk, 1, w, st) for bn, bk, w, st in
           ((32, 512, 4, 2), (16, 512, 2, 2), (64, 256, 4, 2), (32, 256, 4, 3), (64, 512, 8, 2),
            (32, 1024, 8, 1))]
    dot = [TileConfig(16, bn, bk, 1, w, st) for bn, bk, w, st in
           ((32, 256, 4, 3), (64, 256, 4, 3), (32, 512, 4, 2), (64, 512, 8, 2))]
    if m <= int_gemv.MAX_FMA_M:
        return (fma + dot[:2]) if m <= 2 else (fma[:3] + dot)
    return dot if m <= int_gemv.MAX_M else []


def default_config(kernel: str, m: int) -> TileConfig:
    """The first candidate for ``m``: the fallback when the table has no entry."""
    configs = candidate_configs(kernel, m)
    if not configs:
        raise ValueError(f"{kernel} has no tile config for M={m}.")
    return configs[0]


@functools.cache
def load_table(path: str = TABLE_PATH) -> dict:
    """The measured dispatch table (empty when none has been written yet)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _nearest_shape(entries: dict, k: int, n: int) -> dict | None:
    """The entry of the measured shape closest to ``(k, n)`` in log-space."""
    best, dist = None, math.inf
    for key, entry in entries.items():
        kk, nn = (int(v) for v in key.split("x"))
        d = abs(math.log(kk / k)) + abs(math.log(nn / n))
        if d < dist:
            best, dist = entry, d
    return best


@dataclasses.dataclass(frozen=True)
class Decision:
    kernel: str | None
    config: TileConfig | None
    reason: str


def decide(w: QArray, activation, m: int, k: int, n: int, table: dict | None = None) -> Decision:
    """Whether the kernel beats the XLA path for this call, according to the measured table.

    The table row of the nearest measured shape is used, at the largest measured
    ``M`` not above ``m`` (the smallest measured ``M`` for smaller ``m``).
    """
    spec = kernel_for(w, activation)
    if spec is None:
        return Decision(None, None, "no kernel implements this format pair")
    case = case_for(w, activation)
    entries = (table if table is not None else load_table()).get("cases", {}).get(case)
    if not entries:
        return Decision(None, None, f"no GPU measurement for case {case!r} in the dispatch table")
    entry = _nearest_shape(entries, k, n)
    ms = entry["m"]
    if m > 2 * max(ms):
        return Decision(None, None, f"{case}: not measured at or near M={m} (largest measured M {max(ms)})")
    i = max([j for j, mm in enumerate(ms) if mm <= m], default=0)
    path = entry["path"][i]
    where = f"{case}: {path} was fastest at M={ms[i]} on the nearest measured shape"
    if path == "xla":
        return Decision(None, None, where)
    if path == "native":
        return Decision(NATIVE, None, where)
    kernel = entry.get("kernel", [spec.name] * len(ms))[i] or spec.name
    return Decision(kernel, TileConfig(**entry["config"][i]), where)
