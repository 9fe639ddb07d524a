"""Sanity check of the device timing used by the kernel benchmark (run on the GPU machine)
-> experiments/results/device_timing_check_<gpu>.md (+ .json).

    python experiments/device_timing_check.py
    python experiments/device_timing_check.py --report-only          # rebuild every device_timing_check_*.md
    python experiments/device_timing_check.py --quick --out /tmp/d   # smoke run: a 256x256 layer (CPU: wall clock)

Records the GPU planes and lines of a profiler trace with the stats of a few kernel
events (so the ``hlo_module`` attribution in ``jquant.device_timing`` can be checked),
then times a bf16 ``jnp.dot`` at M = 1 on 4096x4096 over 8 weight copies three ways:
device kernel time, device span, and wall clock per call. The HBM floor of that GEMV
is 32 MiB / bandwidth (about 11-13 us on an H100).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
from pathlib import Path

import harness
from harness import Column, Results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# jax and jquant are imported where they are used: --help and --report-only need neither.


def dump_trace(size: int) -> list[str]:
    """The device planes and lines of a profiler trace of two ``jnp.dot(x, w) + 1`` calls, the first three
    events of each line with their stats (empty without a GPU)."""
    import jax
    import jax.numpy as jnp

    from jquant.device_timing import tagged_jit

    x = jnp.ones((1, size), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    f, module = tagged_jit(lambda x, w: jnp.dot(x, w) + 1)
    jax.block_until_ready(f(x, w))
    out = [f"module {module}"]
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(2):
            jax.block_until_ready(f(x, w))
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        for plane in data.planes:
            if not plane.name.startswith("/device"):
                continue
            for line in plane.lines:
                evs = list(line.events)
                out.append(f"{plane.name} | line {line.name!r}: {len(evs)} events")
                for ev in evs[:3]:
                    out.append(f"    {ev.name[:70]!r} {ev.duration_ns:.0f} ns "
                               f"stats={[(k, str(v)[:40]) for k, v in ev.stats][:8]}")
    return out


def run(args: argparse.Namespace, results: Results) -> None:
    """The trace dump, the three timings of the GEMV and the device ceilings (one run: all rows together)."""
    import jax
    import jax.numpy as jnp

    from jquant import benchmark as B

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    trace = dump_trace(args.size)
    print("\n".join(trace), flush=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, args.size), jnp.bfloat16)
    ws = B.weight_sets(None, args.size, args.size, args.copies, jax.random.PRNGKey(2))
    t = B.time_jobs([(lambda x, w: jnp.dot(x, w), x, ws)], args.reps)[0]
    wall = B.median_time(jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws]), (x, ws), args.reps) / len(ws)
    print(f"bf16 {args.size}x{args.size} M=1: device {t.seconds * 1e6:.1f} us, span {t.span_seconds * 1e6:.1f} us, "
          f"wall {wall * 1e6:.1f} us per call; kernels {t.kernels}", flush=True)
    ceilings = {k: float(v) for k, v in B.measure_ceilings().items()}
    print("ceilings", ceilings, flush=True)
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__, method=t.method,
                     kernels={k: float(v) for k, v in t.kernels.items()}, ceilings=ceilings, trace=trace)
    results.add_rows([{"timing": "kernels", "seconds": float(t.seconds)},
                      {"timing": "span", "seconds": float(t.span_seconds)},
                      {"timing": "wall clock", "seconds": float(wall)}])


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base folder>/<json name>.md`` for each run."""
    for results in runs:
        args, meta = results.args, results.meta
        size = args["size"]
        floor = size * size * 2 / meta["ceilings"]["hbm_bytes_per_s"]
        how = ("`kernels`: summed GPU kernel durations per call from a profiler trace; `span`: the per-call span "
               "including the gaps between them" if meta["method"] == "device" else
               "no GPU trace: `kernels` and `span` are wall clock too")
        kernels = ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in meta["kernels"].items()) or "none attributed"
        lines = [f"# Device timing check on {meta['device']}", "",
                 f"JAX {meta['jax']}. bf16 `jnp.dot` at M = 1 on {size}x{size} over {args['copies']} weight copies "
                 f"({args['reps']} runs), per call ({how}); HBM floor = {size * size * 2 / 2**20:g} MiB of weights "
                 f"/ the measured HBM rate = {floor * 1e6:.1f} us. {harness.reproduce(results.command)}", "",
                 *harness.table(results.rows, [Column("timing", "timing"),
                                               Column("us per call", lambda r: 1e6 * r["seconds"], ".1f"),
                                               Column("x HBM floor", lambda r: r["seconds"] / floor, ".2f")]), "",
                 f"- Kernels per call: {kernels}.",
                 f"- Ceilings: HBM {meta['ceilings']['hbm_bytes_per_s'] / 1e12:.2f} TB/s (device copy, read + "
                 f"write), bf16 matmul {meta['ceilings']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.", "",
                 "Profiler trace: device planes and lines, the first events of each with their stats:", "",
                 "```text", *meta["trace"], "```"]
        harness.write_text_atomic(base.parent / f"{results.path.stem}.md", "\n".join(lines) + "\n")


def _stem(args: argparse.Namespace) -> str:
    """``device_timing_check_<device>`` of this machine (with --report-only each report is named after its JSON)."""
    if args.report_only is not None:
        return "device_timing_check"
    import jax

    return "device_timing_check_" + jax.devices()[0].device_kind.lower().replace(" ", "_")


def _report_inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    """After a run, its own JSON; with a bare ``--report-only``, every device_timing_check_*.json in --out."""
    if args.report_only is None:
        return [path]
    paths = sorted(args.out.glob("device_timing_check_*.json"))
    if not paths:
        raise SystemExit(f"--report-only: no device_timing_check_*.json in {args.out}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="rows and columns of the weight (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=8, help="distinct weight copies per call (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=10, help="timed runs (default: %(default)s)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=_stem, key=("timing",), run=run, report=report, report_inputs=_report_inputs,
                           quick={"size": 256, "copies": 2, "reps": 2})


if __name__ == "__main__":
    main()
