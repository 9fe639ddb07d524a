"""GPU kernel correctness and the benchmark sweep (run on the GPU machine) -> experiments/results/kernels_<gpu>.md.

    python experiments/bench_kernels.py --check                      # every kernel vs its reference
    python experiments/bench_kernels.py --sweep --out DIR [--shapes 4096x4096] [--m 1,16] [--cases ...]
    python experiments/bench_kernels.py --merge A.json B.json --out experiments/results --write-table
    python experiments/bench_kernels.py --report-only               # rebuild every kernels_*.md, kernel_check_*.md
    python experiments/bench_kernels.py --sweep --quick --out /tmp/k   # smoke run: one tiny shape (CPU: interpret mode)

One mode per call. ``--check`` runs each kernel against its float32 reference on fresh random bf16 inputs
and writes ``kernel_check_<gpu>.json`` and ``.md``. ``--sweep`` tunes inline (every candidate config of
every kernel of a case at the tuning batch sizes ``jquant.benchmark.TUNE_M``; other M reuse the nearest
larger tuned choice) and writes ``DIR/kernels_<gpu>.json`` and ``.md``, the JSON after every shape (with
``--resume``, the shapes already in it are skipped; ``--shapes`` may then name further ones). ``--merge``
combines sweep JSON files (no GPU needed). ``--write-table`` also writes ``pallas_kernels/dispatch_table.json``
from the sweep or merge (when a kernel is used by ``jquant.ops``), ``--update-table`` merges into it. Times
are device kernel times from a profiler trace (``jquant.device_timing``). ``--report-only`` with JSON files
writes ``<out>/<json name>.md`` for each; sweep JSON files of the older layout
(``{"device", "jax", "ceilings", "rows", "tuned"}``) are read too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# jax and jquant are imported where they are used: --help needs neither (--report-only: jquant.benchmark_report).
SWEEP_KEY = ("case", "path", "k", "n", "m")
CHECK_KEY = ("case", "kernel", "weight", "k", "n", "m", "config")
# The check's default shapes: (K, N, M) of the case kernels, then (kernel, weight, shapes) of the GEMV kernels.
CHECK_SHAPES = ((4096, 4096, 1), (4096, 4096, 7), (14336, 1024, 1030))
CHECK_EXTRA = (("pallas-int-gemv", "int4-g128", ((4096, 4096, 1), (4096, 4096, 3), (14336, 4096, 16))),
               ("pallas-int-gemv", "int8", ((4096, 4096, 1), (4096, 14336, 9))),
               ("pallas-int-gemv", "int4-g128-asym", ((4096, 4096, 2), (4096, 4096, 12))),
               ("pallas-codebook-gemv", "vq-d4-k8", ((4096, 4096, 1), (4096, 4096, 3))),
               ("pallas-codebook-gemv", "vq-d8-k16", ((4096, 4096, 1),)))
TOLERANCE = 2e-2  # relative error above which a kernel fails the check
# The W4A16 decode target (docs/kernels.md): the int4 g128 kernel 3x over bf16 at M=1 on 4096x4096 and larger.
W4A16_CASE, W4A16_TARGET, W4A16_MIN_SIDE = "w4a16-int4-g128", 3.0, 4096


def _log(line: str) -> None:
    print(line, flush=True)


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (numpy and jax scalars and arrays as numbers and lists)."""
    import numpy as np

    return json.loads(json.dumps(value, default=lambda o: np.asarray(o).tolist()))


def _ints(text: str, sep: str = ",") -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(sep))


def _device_name(device: str) -> str:
    return device.replace(" ", "_").lower()


def _short(config: dict | None) -> str:
    """A tile config as ``bm16 bn64 bk128 sk4 w4 s3`` (``qik``: activation quantized in the kernel)."""
    if not config:
        return ""
    keys = (("bm", "block_m"), ("bn", "block_n"), ("bk", "block_k"), ("sk", "split_k"), ("w", "num_warps"),
            ("s", "num_stages"))
    short = " ".join(f"{a}{config[b]}" for a, b in keys if b in config)
    return short + " qik" if config.get("quantize_in_kernel") else short


def _check_one(log, row: dict, x, w, act, cfg) -> dict:
    """``row`` completed with the kernel's relative error against its float32 reference, and its status."""
    import jax.numpy as jnp

    from jquant.pallas_kernels import registry

    spec = registry.get(row["kernel"])
    try:
        spec.check(x, w, act, cfg)
    except ValueError as e:
        log(f"  {row['case'] or row['kernel']} {row['weight']} K={row['k']} N={row['n']} M={row['m']} {cfg}: "
            f"not applicable ({e})")
        return {**row, "rel_err": None, "status": "not applicable", "error": str(e)[:300]}
    ref = spec.reference(x.astype(jnp.float32), w, act)
    try:
        y = spec.run(x, w, act, cfg).astype(jnp.float32)
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        log(f"FAIL {row['case'] or row['kernel']} {row['weight']} {cfg}: {type(e).__name__}: {str(e)[:300]}")
        return {**row, "rel_err": None, "status": "FAIL", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    bad = not bool(jnp.all(jnp.isfinite(y))) or not err <= TOLERANCE
    log(f"{'FAIL' if bad else 'ok  '} {row['case'] or row['kernel']:18s} {row['weight']} K={row['k']} N={row['n']} "
        f"M={row['m']} {cfg}: rel err {err:.2e}")
    return {**row, "rel_err": err, "status": "FAIL" if bad else "ok", "error": None}


def check(args: argparse.Namespace, results: Results) -> None:
    """Each case's kernel (first and last candidate config) and each GEMV kernel (every config) against its
    float32 reference on fresh random bf16 inputs (key: the time); rows already in ``results`` are skipped."""
    import time

    import jax
    import jax.numpy as jnp

    from jquant import benchmark as B
    from jquant.formats import get_format
    from jquant.pallas_kernels import registry

    only = None if not args.check_kernels else set(args.check_kernels.split(","))
    shapes = None if not args.check_shapes else tuple(_ints(s, "x") for s in args.check_shapes.split(","))
    seed = results.meta.get("seed", int(time.time()))
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__, seed=seed)
    key = jax.random.PRNGKey(seed)
    plan = [(case, case.kernel, case.weight, case.activation, shapes or CHECK_SHAPES, True) for case in B.CASES]
    plan += [(None, kernel, weight, None, shapes or extra, False) for kernel, weight, extra in CHECK_EXTRA]
    for case, kernel, weight, activation, case_shapes, ends_only in plan:
        if only is not None and kernel not in only:
            continue
        act = None if activation is None else get_format(activation)
        for k, n, m in case_shapes:
            key, kw, kx = jax.random.split(key, 3)
            configs = registry.candidate_configs(kernel, m)
            todo = []
            for cfg in configs[:1] + configs[-1:] if ends_only else configs:
                row = {"case": None if case is None else case.name, "kernel": kernel, "weight": weight,
                       "activation": activation, "k": k, "n": n, "m": m, "config": cfg.as_dict()}
                if not results.has(**{f: row[f] for f in CHECK_KEY}):
                    todo.append((row, cfg))
            if not todo:
                continue
            w = B.weight_sets(case or B.Case("check", weight, None, kernel), k, n, 1, kw)[0]
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            results.add_rows([_plain(_check_one(_log, r, x, w, act, cfg)) for r, cfg in todo])
    if any(r["status"] == "FAIL" for r in results.rows):
        _log("KERNEL CHECK FAILED")


def _result(results: Results) -> dict:
    """A sweep's results in ``jquant.benchmark.run_benchmark``'s layout."""
    meta = results.meta
    return {"device": meta["device"], "jax": meta["jax"], "ceilings": meta["ceilings"], "rows": results.rows,
            "tuned": meta.get("tuned", {})}


def _write_table(args: argparse.Namespace, results: Results) -> None:
    """``--write-table`` / ``--update-table``: the dispatch table of the sweep (merged into the existing one)."""
    if not (args.write_table or args.update_table):
        return
    from jquant.benchmark_report import dispatch_table, merge_tables
    from jquant.pallas_kernels import registry

    table = dispatch_table(_result(results))
    if args.update_table:
        table = merge_tables(registry.load_table(), table)
    harness.write_text_atomic(Path(registry.TABLE_PATH), json.dumps(table, indent=1))


def sweep(args: argparse.Namespace, results: Results) -> None:
    """``jquant.benchmark.run_benchmark`` one shape at a time (each shape's rows saved when it finishes)."""
    import jax

    from jquant import benchmark as B

    names = None if not args.cases else args.cases.split(",")
    unknown = sorted(set(names or ()) - {c.name for c in B.CASES})
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(c.name for c in B.CASES)}")
    cases = B.CASES if names is None else tuple(c for c in B.CASES if c.name in names)
    shapes = B.SHAPES if not args.shapes else tuple(_ints(s, "x") for s in args.shapes.split(","))
    ms = B.M_VALUES if not args.m else _ints(args.m)
    tune_m = B.TUNE_M if not args.tune_m else _ints(args.tune_m)
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__)
    for k, n in shapes:
        done = results.meta.get("shapes_done", [])
        if f"{k}x{n}" in done:
            continue
        part = _plain(B.run_benchmark(cases, [(k, n)], ms, None, args.reps, not args.no_xla, _log,
                                      results.meta.get("ceilings"), tune_m))
        results.add_rows(part["rows"])
        results.set_meta(ceilings=part["ceilings"], tuned={**results.meta.get("tuned", {}), **part["tuned"]},
                         shapes_done=[*done, f"{k}x{n}"])
    _write_table(args, results)


def merge(args: argparse.Namespace, results: Results) -> None:
    """The rows and tuned choices of every ``--merge`` file; device, JAX version and ceilings of the first."""
    parts = [Results.load(p, lambda data: legacy(data, args)) for p in args.merge]
    for path, part in zip(args.merge, parts):
        if tuple(part.key) != SWEEP_KEY:
            raise SystemExit(f"--merge: {path} is not a sweep JSON (its rows are keyed by {part.key})")
    first = parts[0].meta
    results.set_meta(device=first["device"], jax=first["jax"], ceilings=first["ceilings"],
                     tuned={k: v for part in parts for k, v in part.meta.get("tuned", {}).items()})
    results.add_rows([r for part in parts for r in part.rows])
    _write_table(args, results)


def run(args: argparse.Namespace, results: Results) -> None:
    import jax

    _log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    (check if args.check else sweep if args.sweep else merge)(args, results)


def _check_report(results: Results) -> str:
    meta, rows = results.meta, results.rows
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "FAIL", "not applicable")}
    columns = [Column("case", "case"), Column("kernel", lambda r: r["kernel"].replace("pallas-", "")),
               Column("weight", "weight"), Column("activation", "activation"),
               Column("K x N", lambda r: f"{r['k']}x{r['n']}"), Column("M", "m"),
               Column("config", lambda r: _short(r["config"])), Column("rel. error", "rel_err", ".2e"),
               Column("status", "status")]
    lines = [f"# Kernel check on {meta['device']} (JAX {meta['jax']})", "",
             "Each kernel against its float32 reference on random bf16 inputs (key "
             f"{meta['seed']}): relative error |y - ref| / |ref|; a kernel fails above {TOLERANCE:g} or with a "
             f"non-finite output or an error. {count['ok']} calls pass, {count['FAIL']} fail, "
             f"{count['not applicable']} configs do not apply to their shape.", "",
             *harness.table(rows, columns), ""]
    if results.command:
        lines += [harness.reproduce(results.command), ""]
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str | None:
    """The W4A16 decode target: ``met`` when the int4 g128 Pallas kernel is at least ``W4A16_TARGET`` times as fast
    as bf16 at M=1 on every measured shape with both sides at least ``W4A16_MIN_SIDE``; ``None`` without such rows."""
    hits = [r for r in rows if r["case"] == W4A16_CASE and r["path"] == "pallas" and r["m"] == 1
            and min(r["k"], r["n"]) >= W4A16_MIN_SIDE]
    if not hits:
        return None
    worst, best = min(hits, key=lambda r: r["vs_bf16"]), max(hits, key=lambda r: r["vs_bf16"])
    met = worst["vs_bf16"] >= W4A16_TARGET
    return (f"{'met' if met else 'not met'}: the {W4A16_CASE} Pallas kernel runs at {worst['vs_bf16']:.2f}x "
            f"({worst['k']}x{worst['n']}) to {best['vs_bf16']:.2f}x ({best['k']}x{best['n']}) the speed of bf16 "
            f"at M=1 over {len(hits)} shapes (device time; target {W4A16_TARGET:g}x at M=1 on "
            f"{W4A16_MIN_SIDE}x{W4A16_MIN_SIDE} and larger).")


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base folder>/<json name>.md`` for each run (``jquant.benchmark_report`` for a sweep)."""
    from jquant.benchmark_report import markdown_report

    for results in runs:
        if tuple(results.key) == CHECK_KEY:
            text = _check_report(results)
            print(text.splitlines()[2], flush=True)
        else:
            text = markdown_report(_result(results))
            verdict = _verdict(results.rows)
            if verdict:  # after the summary table
                text = text.replace("\n## All paths\n", f"\n{harness.verdict(verdict)}\n\n## All paths\n", 1)
            if results.command:
                text += f"\n{harness.reproduce(results.command)}\n"
            print(markdown_report(_result(results), summary_only=True), flush=True)
        harness.write_text_atomic(base.parent / f"{results.path.stem}.md", text)


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """A sweep JSON of the older layout (``run_benchmark``'s dict; its command was not recorded)."""
    return {"script": "bench_kernels", "command": "", "args": {}, "key": list(SWEEP_KEY),
            "meta": {k: data[k] for k in ("device", "jax", "ceilings", "tuned") if k in data}, "rows": data["rows"]}


def _stem(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``kernels_<gpu>`` (sweep: this machine's device; merge: the first file's) or ``kernel_check_<gpu>``."""
    if args.report_only is not None:
        return "kernels"  # each report is named after its JSON
    if not (args.check or args.sweep or args.merge):
        parser.error("choose one of --check, --sweep, --merge (or --report-only)")
    if args.merge:
        return "kernels_" + _device_name(Results.load(args.merge[0], lambda d: legacy(d, args)).meta["device"])
    import jax

    return ("kernel_check_" if args.check else "kernels_") + _device_name(jax.devices()[0].device_kind)


def _report_inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    """After a run, its own JSON; with a bare ``--report-only``, every kernels_*.json and kernel_check_*.json."""
    if args.report_only is None:
        return [path]
    paths = sorted(args.out.glob("kernels_*.json")) + sorted(args.out.glob("kernel_check_*.json"))
    if not paths:
        raise SystemExit(f"--report-only: no kernels_*.json or kernel_check_*.json in {args.out}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="every kernel against its float32 reference")
    mode.add_argument("--sweep", action="store_true", help="time every path of every case (tuning inline)")
    mode.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                      help="sweep JSON files to combine (no GPU needed)")
    parser.add_argument("--check-kernels", default=None, help="comma-separated kernel names to check (default: all)")
    parser.add_argument("--check-shapes", default=None,
                        help="KxNxM shapes of every checked kernel, e.g. 256x256x1 (default: 4096x4096 at M=1 and 7 "
                             "and 14336x1024 at M=1030 for the case kernels, decode shapes for the GEMV kernels)")
    parser.add_argument("--tune-m", default=None, help="batch sizes that tune every candidate, e.g. 1,4,16 "
                                                       "(default: jquant.benchmark.TUNE_M)")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192 (default: jquant.benchmark.SHAPES)")
    parser.add_argument("--m", default=None, help="e.g. 1,16,4096 (default: jquant.benchmark.M_VALUES)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per path (default: %(default)s)")
    parser.add_argument("--no-xla", action="store_true", help="do not time the XLA dequantize path")
    parser.add_argument("--write-table", action="store_true",
                        help="write pallas_kernels/dispatch_table.json from the sweep or merge")
    parser.add_argument("--update-table", action="store_true",
                        help="merge the measured rows into the existing dispatch table instead of replacing it")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: _stem(parser, a),
                           key=lambda a: CHECK_KEY if a.check else SWEEP_KEY, run=run, report=report,
                           legacy=legacy, report_inputs=_report_inputs,
                           volatile=("check_kernels", "shapes", "write_table", "update_table"),
                           quick={"shapes": "256x256", "m": "1", "tune_m": "1", "cases": "w8a16-int8", "reps": 1,
                                  "check_shapes": "256x256x1", "check_kernels": "pallas-weight-only-int"})


if __name__ == "__main__":
    main()
