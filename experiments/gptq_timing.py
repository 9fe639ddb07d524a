"""CPU time of GPTQ on one 4096x4096 layer (int4, groups of 128) with a random correlated Hessian
-> experiments/results/gptq_timing.md (+ .json).

    python experiments/gptq_timing.py
    python experiments/gptq_timing.py --quick --out /tmp/t     # smoke run: a 256x256 layer

Measures the wall time of the first call (includes compilation) and of a second call on a new
weight of the same shape (compiled code reused). End-to-end quantization times of whole models
are in baselines.md.
"""

import argparse
import os
import time
from pathlib import Path

import harness
from harness import Column, Results

CALLS = ("first (includes compilation)", "second (compiled code reused, new weights)")
PAPER_GPU_HOURS = 4  # the GPTQ paper: a 175B-parameter model quantized in about four GPU hours (one A100)


def run(args: argparse.Namespace, results: Results) -> None:
    """Time GPTQ twice on random weights of one shape (a fresh run: the first call must include compilation)."""
    import jax
    import numpy as np

    from jquant.algorithms.weights import gptq_weight
    from jquant.calib.capture import InputStatistics
    from jquant.formats import get_format

    n = args.size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.tokens, 256)).astype(np.float32) @ rng.normal(size=(256, n)).astype(np.float32)
    x += 0.1 * rng.normal(size=x.shape).astype(np.float32)
    stats = InputStatistics(hessian=(x.T @ x).astype(np.float64), count=float(len(x)), absmax=np.abs(x).max(0))
    fmt = get_format(args.format)
    results.set_meta(platform=jax.devices()[0].platform, cpus=os.cpu_count(), jax=jax.__version__)
    for call in CALLS:
        w = jax.numpy.asarray(rng.normal(size=(n, n)).astype(np.float32) * 0.02)
        t0 = time.perf_counter()
        jax.block_until_ready(gptq_weight(w, fmt, axis=0, stats=stats))
        results.add({"call": call, "seconds": time.perf_counter() - t0})
        print(f"GPTQ {n}x{n} {args.format} ({call}): {results.rows[-1]['seconds']:.1f} s", flush=True)


def _verdict(rows: list[dict], args: dict, meta: dict) -> str:
    """GPTQ's runtime claim needs a GPU and a 175B model; this script times one layer, so it is always ``not testable
    here``, with the layer's times."""
    first, second = (next(r["seconds"] for r in rows if r["call"] == call) for call in CALLS)
    return (f"not testable here: the GPTQ paper's runtime (a 175B-parameter model in about {PAPER_GPU_HOURS} GPU "
            f"hours) needs a GPU and a full-size model; on {meta['platform'].upper()} ({meta['cpus']} cores) one "
            f"{args['size']}x{args['size']} {args['format']} layer takes {second:.1f} s with compiled code "
            f"({first:.1f} s on the first call, compilation included).")


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``."""
    results = runs[0]
    args, meta = results.args, results.meta
    lines = ["# GPTQ CPU time", "",
             f"One {args['size']}x{args['size']} layer, {args['format']}, a Hessian from {args['tokens']} correlated "
             f"random tokens, on {meta['platform'].upper()} ({meta['cpus']} cores; jax {meta['jax']}). "
             f"{harness.reproduce(results.command)}", "",
             *harness.table(results.rows, [Column("call", "call"),
                                           Column("wall time", lambda r: f"{r['seconds']:.1f} s")]), "",
             harness.verdict(_verdict(results.rows, args, meta)), "",
             "End-to-end quantization times of whole models (calibration forwards included): see `baselines.md`.", ""]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="rows and columns of the layer (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens behind the Hessian (default: %(default)s)")
    parser.add_argument("--format", default="int4-g128-asym", help="weight format (default: %(default)s)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "gptq_timing", key=("call",), run=run, report=report,
                           quick={"size": 256, "tokens": 512})


if __name__ == "__main__":
    main()
