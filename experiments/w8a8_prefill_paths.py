"""Where W8A8 prefill time goes: XLA int8 GEMM variants against bf16 (run on the GPU machine)
-> experiments/results/w8a8_prefill_<gpu>[_<XLA_FLAGS>].md (+ .json).

    python experiments/w8a8_prefill_paths.py [--shapes 14336x4096] [--m 1024,4096,8192]
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python experiments/w8a8_prefill_paths.py --shapes 14336x4096
    python experiments/w8a8_prefill_paths.py --report-only            # rebuild every w8a8_prefill_*.md
    python experiments/w8a8_prefill_paths.py --quick --out /tmp/w     # smoke run: one tiny shape (CPU: wall clock)

For each shape and M it times (device kernel time, ``jquant.device_timing``) and breaks
down by kernel:

- ``bf16``: ``jnp.dot`` of bf16 ``x [M, K]`` and ``w [K, N]``;
- ``native``: ``xla_native_dot`` (per-token int8 quantization of x, then an
  s8 x s8 -> s32 ``dot_general`` of the stored ``[K, N]`` codes, scaled epilogue);
- ``int8-kn``: the int8 ``dot_general`` alone on pre-quantized x and ``[K, N]`` codes;
- ``int8-nk``: the same on codes transposed once to ``[N, K]`` (both operands K-major,
  the layout cuBLASLt's int8 IMMA wants);
- ``native-nk``: ``native`` with the ``[N, K]`` codes.

Run it under different ``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_triton_gemm=false``) to
compare XLA's GEMM back ends: the flags name the results file (and are recorded in every row).
The rows of a shape and M are saved when they finish (``--resume`` skips those in the JSON).
A JSON of the older layout (``{"device", "jax", "rows"}``, written by ``--out FILE.json``) is read too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# jax and jquant are imported where they are used: --help and --report-only need neither.
PATHS = ("bf16", "native", "int8-kn", "int8-nk", "native-nk")


def int8_dot(xq, codes, contract_w: int):
    """s8 x s8 -> s32 ``dot_general`` of ``xq [M, K]`` and codes contracted on their axis ``contract_w``."""
    import jax
    import jax.numpy as jnp

    return jax.lax.dot_general(xq, codes, (((1,), (contract_w,)), ((), ())), preferred_element_type=jnp.int32)


def native_nk(x, w_nk, scales, act):
    """``native`` with ``[N, K]`` codes: per-token int8 ``x``, the int8 dot, then both scales."""
    import jax.numpy as jnp

    from jquant.formats import quantize

    xq = quantize(x, act, axis=-1)
    acc = int8_dot(xq.codes, w_nk, 1)
    y = acc.astype(jnp.float32) * xq.scales.astype(jnp.float32) * scales.astype(jnp.float32).reshape(1, -1)
    return y.astype(x.dtype)


def _xla_flags() -> str:
    return os.environ.get("XLA_FLAGS", "")


def run(args: argparse.Namespace, results: Results) -> None:
    """Time the five paths at every shape and M not already in ``results``."""
    import jax
    import jax.numpy as jnp

    from jquant import benchmark as B
    from jquant.formats import get_format, quantize
    from jquant.pallas_kernels import xla_native_dot

    act = get_format("int8")
    flags = _xla_flags()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; XLA_FLAGS={flags!r}", flush=True)
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__, xla_flags=flags)
    key = jax.random.PRNGKey(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        ms = [m for m in (int(v) for v in args.m.split(","))
              if not all(results.has(k=k, n=n, m=m, path=p) for p in PATHS)]
        if not ms:
            continue
        wb = B.weight_sets(None, k, n, 2, key)
        wq = [quantize(w.astype(jnp.float32), "int8", axis=0) for w in wb]
        nk = [jnp.asarray(q.codes.T) for q in wq]
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            xq = quantize(x, act, axis=-1).codes
            jobs = dict(zip(PATHS, [
                (lambda x, w: jnp.dot(x, w), x, wb),
                (lambda x, w: xla_native_dot.native_lowp_dot(x, w, act), x, wq),
                (lambda xq, c: int8_dot(xq, c.codes, 0), xq, wq),
                (lambda xq, c: int8_dot(xq, c, 1), xq, nk),
                (lambda x, c: native_nk(x, c[0], c[1], act), x, [(c, q.scales) for c, q in zip(nk, wq)]),
            ]))
            times = B.time_jobs(list(jobs.values()), args.reps, print)
            base = times[0].seconds
            rows = [dict(k=k, n=n, m=m, path=name, seconds=t.seconds, vs_bf16=base / t.seconds, kernels=t.kernels,
                         xla_flags=flags) for name, t in zip(jobs, times)]
            for row in rows:
                print(_line(row), flush=True)
            results.add_rows(rows)


def _top(row: dict) -> str:
    """The four longest kernels of a row, ``name microseconds``."""
    top = sorted(row["kernels"].items(), key=lambda kv: -kv[1])[:4]
    return "; ".join(f"{kn} {v * 1e6:.0f}" for kn, v in top)


def _tops(row: dict) -> float:
    return 2 * row["m"] * row["n"] * row["k"] / row["seconds"] / 1e12


def _line(row: dict) -> str:
    return (f"{row['k']}x{row['n']} M={row['m']:5d} {row['path']:10s} {row['seconds'] * 1e6:9.1f} us  "
            f"x{row['vs_bf16']:5.2f} vs bf16  {_tops(row):6.0f} TOP/s  {_top(row)}")


COLUMNS = [Column("K x N", lambda r: f"{r['k']}x{r['n']}"), Column("M", "m"), Column("path", "path"),
           Column("time (us)", lambda r: 1e6 * r["seconds"], ".1f"), Column("x bf16", "vs_bf16", ".2f"),
           Column("TOP/s", _tops, ".0f"), Column("longest kernels (us)", _top)]


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base folder>/<json name>.md`` for each run."""
    for results in runs:
        meta = results.meta
        intro = (f"JAX {meta['jax']}, `XLA_FLAGS={meta['xla_flags']!r}`; time per call (device kernel time on a GPU, "
                 "`jquant.benchmark.time_jobs`), its ratio to bf16 `jnp.dot` at the same shape and M, int8 "
                 "tera-operations per second and the longest kernels.")
        if results.command:
            intro += " " + harness.reproduce(results.command)
        lines = [f"# W8A8 prefill paths on {meta['device']}", "", intro, "", *harness.table(results.rows, COLUMNS)]
        harness.write_text_atomic(base.parent / f"{results.path.stem}.md", "\n".join(lines) + "\n")


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The older layout ``{"device", "jax", "rows"}`` (its command and arguments were not recorded)."""
    flags = {r.get("xla_flags", "") for r in data["rows"]}
    return {"script": "w8a8_prefill_paths", "command": "", "args": {}, "key": ["k", "n", "m", "path"],
            "meta": {"device": data["device"], "jax": data["jax"], "xla_flags": " / ".join(sorted(flags))},
            "rows": data["rows"]}


def _stem(args: argparse.Namespace) -> str:
    """``w8a8_prefill_<device>`` of this machine, ``_<XLA_FLAGS>`` appended when they are set (with
    --report-only each report is named after its JSON)."""
    if args.report_only is not None:
        return "w8a8_prefill"
    import jax

    flags = re.sub(r"[^a-z0-9]+", "_", _xla_flags().lower()).strip("_")
    return "_".join(["w8a8_prefill", jax.devices()[0].device_kind.lower().replace(" ", "_"), *([flags] * bool(flags))])


def _report_inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    """After a run, its own JSON; with a bare ``--report-only``, every w8a8_prefill_*.json in --out."""
    if args.report_only is None:
        return [path]
    paths = sorted(args.out.glob("w8a8_prefill_*.json"))
    if not paths:
        raise SystemExit(f"--report-only: no w8a8_prefill_*.json in {args.out}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,4096x14336,8192x8192,4096x4096",
                        help="KxN shapes (default: %(default)s)")
    parser.add_argument("--m", default="1024,4096,8192", help="batch sizes (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per path (default: %(default)s)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=_stem, key=("k", "n", "m", "path"), run=run, report=report, legacy=legacy,
                           report_inputs=_report_inputs, volatile=("shapes", "m"),
                           quick={"shapes": "256x128", "m": "16", "reps": 1})


if __name__ == "__main__":
    main()
