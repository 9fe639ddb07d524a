"""GPU kernel correctness, tuning and the benchmark sweep (run on the GPU machine).

    python experiments/bench_kernels.py --check                      # every kernel vs its reference
    python experiments/bench_kernels.py --tune --out DIR             # pick tile configs per M bucket
    python experiments/bench_kernels.py --sweep --configs DIR/tuned.json --out DIR [--write-table]
    python experiments/bench_kernels.py --merge A.json B.json --out experiments/results --write-table

``--sweep`` writes ``DIR/kernels_<gpu>.json`` and ``.md``; ``--write-table`` also
writes ``pallas_kernels/dispatch_table.json`` (when a kernel is used by ``jquant.ops``).
Copy the results into ``experiments/results/``.
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
from jquant.pallas_kernels._common import TileConfig  # noqa: E402
from jquant.benchmark_report import dispatch_table, markdown_report  # noqa: E402

TUNE_SHAPE = (4096, 14336)
TUNE_M = (1, 16, 256, 4096)


def check_all(log=print) -> bool:
    """Each case's kernel against its float32 reference on fresh random bf16 inputs."""
    ok = True
    key = jax.random.PRNGKey(int(time.time()))
    for case in B.CASES:
        act = None if case.activation is None else get_format(case.activation)
        spec = registry.get(case.kernel)
        for (k, n), m in (((4096, 4096), 1), ((4096, 4096), 7), ((14336, 1024), 1030)):
            key, kw, kx = jax.random.split(key, 3)
            w = B.weight_sets(case, k, n, 1, kw)[0]
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            ref = spec.reference(x.astype(jnp.float32), w, act)
            for cfg in (registry.default_config(case.kernel, m), registry.candidate_configs(case.kernel, m)[-1]):
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
    return ok


def tune_all(log=print) -> dict:
    key = jax.random.PRNGKey(0)
    tuned = {}
    for case in B.CASES:
        for m in TUNE_M:
            try:
                cfg, t = B.tune(case, *TUNE_SHAPE, m, key, log=log)
            except Exception as e:  # noqa: BLE001 - report every failure and keep tuning the rest
                log(f"TUNE FAIL {case.name} M={m}: {type(e).__name__}: {str(e)[:400]}")
                continue
            tuned[f"{case.name}|{m}"] = cfg.as_dict()
            log(f"best {case.name} M={m}: {cfg} {t * 1e6:.1f} us")
    return tuned


def configs_from(tuned: dict) -> dict:
    """Tuned configs keyed ``(case, m)`` for every sweep M.

    M = 1 takes the config tuned at 1 (it may be the GEMV variant); any other M takes
    the one tuned at the smallest tuned M >= M (the largest tuned M beyond that).
    """
    per_case: dict = {}
    for key, cfg in tuned.items():
        case, m = key.split("|")
        per_case.setdefault(case, {})[int(m)] = TileConfig(**cfg)
    out = {}
    for case, by_m in per_case.items():
        for m in B.M_VALUES:
            larger = [t for t in by_m if t >= m and (t > 1 or m == 1)]
            pick = min(larger) if larger else max(by_m)
            out[(case, m)] = by_m[pick]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--configs", help="tuned.json from --tune")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192")
    p.add_argument("--m", default=None, help="e.g. 1,16,4096")
    p.add_argument("--cases", default=None, help="comma-separated case names")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-xla", action="store_true")
    p.add_argument("--write-table", action="store_true")
    p.add_argument("--merge", nargs="+", help="sweep JSON files to combine (no GPU needed)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.check and not check_all(lambda s: print(s, flush=True)):
        print("KERNEL CHECK FAILED", flush=True)
    tuned = {}
    if args.configs:
        with open(args.configs) as f:
            tuned = json.load(f)
    if args.tune:
        tuned.update(tune_all(lambda s: print(s, flush=True)))
        with open(os.path.join(args.out, "tuned.json"), "w") as f:
            json.dump(tuned, f, indent=1)
    if args.sweep:
        cases = B.CASES if not args.cases else tuple(c for c in B.CASES if c.name in args.cases.split(","))
        shapes = B.SHAPES if not args.shapes else tuple(
            tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        ms = B.M_VALUES if not args.m else tuple(int(v) for v in args.m.split(","))
        result = None
        for shape in shapes:  # written after every shape, so a timeout keeps what was measured
            part = B.run_benchmark(cases, [shape], ms, configs_from(tuned), args.reps, not args.no_xla,
                                   lambda s: print(s, flush=True), None if result is None else result["ceilings"])
            result = part if result is None else {**result, "rows": result["rows"] + part["rows"]}
            result["tuned"] = tuned
            write_outputs(result, args.out, False)
        write_outputs(result, args.out, args.write_table)
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(json.load(f))
        result = {**parts[0], "rows": [r for part in parts for r in part["rows"]]}
        write_outputs(result, args.out, args.write_table)


def write_outputs(result: dict, out: str, write_table: bool) -> None:
    gpu = result["device"].replace(" ", "_").lower()
    B.write_json(result, os.path.join(out, f"kernels_{gpu}.json"))
    with open(os.path.join(out, f"kernels_{gpu}.md"), "w") as f:
        f.write(markdown_report(result))
    if write_table:
        with open(registry.TABLE_PATH, "w") as f:
            json.dump(dispatch_table(result), f, indent=1)
    print(markdown_report(result, summary_only=True), flush=True)

if __name__ == "__main__":
    main()
