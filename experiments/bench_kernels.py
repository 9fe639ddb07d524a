"""GPU kernel correctness and the benchmark sweep (run on the GPU machine).

    python experiments/bench_kernels.py --check                      # every kernel vs its reference
    python experiments/bench_kernels.py --sweep --out DIR [--shapes 4096x4096] [--m 1,16] [--cases ...]
    python experiments/bench_kernels.py --merge A.json B.json --out experiments/results --write-table

``--sweep`` tunes inline (every candidate config of every kernel of a case at the
tuning batch sizes ``jquant.benchmark.TUNE_M``; other M reuse the nearest larger tuned
choice) and writes ``DIR/kernels_<gpu>.json`` and ``.md``; ``--write-table`` also
writes ``pallas_kernels/dispatch_table.json`` (when a kernel is used by ``jquant.ops``).
Times are device kernel times from a profiler trace (``jquant.device_timing``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jquant import benchmark as B  # noqa: E402
from jquant.formats import get_format  # noqa: E402
from jquant.pallas_kernels import registry  # noqa: E402
from jquant.benchmark_report import dispatch_table, markdown_report, merge_tables  # noqa: E402

CHECK_EXTRA = (("pallas-int-gemv", "int4-g128", ((4096, 4096, 1), (4096, 4096, 3), (14336, 4096, 16))),
               ("pallas-int-gemv", "int8", ((4096, 4096, 1), (4096, 14336, 9))),
               ("pallas-int-gemv", "int4-g128-asym", ((4096, 4096, 2), (4096, 4096, 12))),
               ("pallas-codebook-gemv", "vq-d4-k8", ((4096, 4096, 1), (4096, 4096, 3))),
               ("pallas-codebook-gemv", "vq-d8-k16", ((4096, 4096, 1),)))


def check_all(log=print, only: set | None = None) -> bool:
    """Each case's kernel (or only the kernels named in ``only``) against its float32 reference on fresh random bf16 inputs."""
    ok = True
    key = jax.random.PRNGKey(int(time.time()))
    for case in B.CASES:
        if only is not None and case.kernel not in only:
            continue
        act = None if case.activation is None else get_format(case.activation)
        spec = registry.get(case.kernel)
        for (k, n), m in (((4096, 4096), 1), ((4096, 4096), 7), ((14336, 1024), 1030)):
            key, kw, kx = jax.random.split(key, 3)
            w = B.weight_sets(case, k, n, 1, kw)[0]
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            ref = spec.reference(x.astype(jnp.float32), w, act)
            configs = registry.candidate_configs(case.kernel, m)
            for cfg in configs[:1] + configs[-1:]:
                try:
                    spec.check(x, w, act, cfg)
                except ValueError as e:
                    log(f"  {case.name} {cfg}: not applicable ({e})")
                    continue
                try:
                    y = spec.run(x, w, act, cfg).astype(jnp.float32)
                except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                    ok = False
                    log(f"FAIL {case.name} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                bad = not bool(jnp.all(jnp.isfinite(y))) or err > 2e-2
                ok &= not bad
                log(f"{'FAIL' if bad else 'ok  '} {case.name:18s} K={k} N={n} M={m} {cfg}: rel err {err:.2e}")
    for kernel, weight, shapes in CHECK_EXTRA:
        if only is not None and kernel not in only:
            continue
        spec = registry.get(kernel)
        for k, n, m in shapes:
            key, kw, kx = jax.random.split(key, 3)
            w = B.weight_sets(B.Case("check", weight, None, kernel), k, n, 1, kw)[0]
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            ref = spec.reference(x.astype(jnp.float32), w, None)
            for cfg in registry.candidate_configs(kernel, m):
                try:
                    spec.check(x, w, None, cfg)
                except ValueError:
                    continue
                try:
                    y = spec.run(x, w, None, cfg).astype(jnp.float32)
                except Exception as e:  # noqa: BLE001
                    ok = False
                    log(f"FAIL {kernel} {weight} K={k} N={n} M={m} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                bad = not bool(jnp.all(jnp.isfinite(y))) or err > 2e-2
                ok &= not bad
                log(f"{'FAIL' if bad else 'ok  '} {kernel} {weight} K={k} N={n} M={m} {cfg}: rel err {err:.2e}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--check-kernels", default=None, help="comma-separated kernel names to check (default: all)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tune-m", default=None, help="batch sizes that tune every candidate (default: %s)"
                   % ",".join(map(str, B.TUNE_M)))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192")
    p.add_argument("--m", default=None, help="e.g. 1,16,4096")
    p.add_argument("--cases", default=None, help="comma-separated case names")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-xla", action="store_true")
    p.add_argument("--write-table", action="store_true")
    p.add_argument("--update-table", action="store_true",
                   help="merge the measured rows into the existing dispatch table instead of replacing it")
    p.add_argument("--merge", nargs="+", help="sweep JSON files to combine (no GPU needed)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    only = None if not args.check_kernels else set(args.check_kernels.split(","))
    if args.check and not check_all(lambda s: print(s, flush=True), only):
        print("KERNEL CHECK FAILED", flush=True)
    tune_m = B.TUNE_M if not args.tune_m else tuple(int(v) for v in args.tune_m.split(","))
    if args.sweep:
        cases = B.CASES if not args.cases else tuple(c for c in B.CASES if c.name in args.cases.split(","))
        shapes = B.SHAPES if not args.shapes else tuple(
            tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        ms = B.M_VALUES if not args.m else tuple(int(v) for v in args.m.split(","))
        result = None
        for shape in shapes:  # written after every shape, so a timeout keeps what was measured
            part = B.run_benchmark(cases, [shape], ms, None, args.reps, not args.no_xla,
                                   lambda s: print(s, flush=True), None if result is None else result["ceilings"],
                                   tune_m)
            result = part if result is None else {**result, "rows": result["rows"] + part["rows"],
                                                  "tuned": {**result["tuned"], **part["tuned"]}}
            write_outputs(result, args.out, False)
        write_outputs(result, args.out, args.write_table, args.update_table)
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(json.load(f))
        result = {**parts[0], "rows": [r for part in parts for r in part["rows"]],
                  "tuned": {k: v for part in parts for k, v in part.get("tuned", {}).items()}}
        write_outputs(result, args.out, args.write_table, args.update_table)


def write_outputs(result: dict, out: str, write_table: bool, update: bool = False) -> None:
    gpu = result["device"].replace(" ", "_").lower()
    B.write_json(result, os.path.join(out, f"kernels_{gpu}.json"))
    with open(os.path.join(out, f"kernels_{gpu}.md"), "w") as f:
        f.write(markdown_report(result))
    if write_table or update:
        table = dispatch_table(result)
        if update:
            table = merge_tables(registry.load_table(), table)
        with open(registry.TABLE_PATH, "w") as f:
            json.dump(table, f, indent=1)
    print(markdown_report(result, summary_only=True), flush=True)

if __name__ == "__main__":
    main()
