"""Grouped (MoE expert) matmul: bf16 ``ragged_dot`` vs the Pallas grouped kernel (int4 g128, int8 per channel)
and MxMoE's mixed-precision call (half the experts int4, half int8), on MoE layer shapes
-> experiments/results/grouped_matmul_<gpu>.md (+ .json).

    python experiments/bench_grouped_matmul.py                       # GPU: Mixtral-like shapes, device time
    python experiments/bench_grouped_matmul.py --report-only         # rebuild the .md from the .json
    python experiments/bench_grouped_matmul.py --quick --out /tmp/g  # CPU smoke run (interpret mode, no timing value)

Tokens are routed to experts with a skewed (Zipf-like) load, ``tokens * top_k`` rows in all. Each row of the table
prints the time per call, the ratio to bf16 ``ragged_dot`` measured in the same run, and the kernel's largest
relative error against its float32 reference. The rows of a token count are saved when it finishes (``--resume``
skips the token counts already in the JSON). Off a GPU only ``--quick`` runs (the times would mean nothing).
No figure in this file has been measured yet: it needs a GPU (issue 8 closing note).
"""

import argparse
import time
from pathlib import Path

import harness
from harness import Column, Results

# jax and jquant are imported where they are used: --help and --report-only need neither.
PATHS = ("bf16 ragged_dot", "pallas int4 g128", "pallas int8", "pallas mixed int4/int8")


def _group_sizes(tokens: int, top_k: int, experts: int, seed: int):
    """Rows per expert ``[E]`` (int32), summing to ``tokens * top_k``: Zipf-like shares (exponent 0.8), shuffled."""
    import jax.numpy as jnp
    import numpy as np

    share = 1.0 / np.arange(1, experts + 1) ** 0.8
    share = np.random.default_rng(seed).permutation(share / share.sum())
    sizes = np.floor(share * tokens * top_k).astype(np.int32)
    sizes[0] += tokens * top_k - sizes.sum()
    return jnp.asarray(sizes)


def _dense(groups, experts: int):
    """The float [E, K, N] stack a mixed call multiplies (each group dequantized into its experts' slots)."""
    import jax.numpy as jnp

    parts = {}
    for ids, weights in groups:
        for i, e in enumerate(ids):
            parts[e] = weights.dequantize(jnp.float32)[i]
    return jnp.stack([parts[e] for e in range(experts)])


def run(args: argparse.Namespace, results: Results) -> None:
    """Time every path at each token count not already in ``results``; save its rows when it finishes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jquant.benchmark import time_jobs
    from jquant.formats import get_format, quantize
    from jquant.pallas_kernels import grouped_matmul as kernel

    if jax.default_backend() != "gpu" and not args.quick:
        raise SystemExit(f"the JAX backend is {jax.default_backend()!r}: run on a GPU, or pass --quick for a smoke "
                         "run (interpret mode, no timing value)")
    experts, k_dim, n_dim = args.experts, args.k, args.n
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__)
    key = jax.random.key(0)
    w = (0.02 * jax.random.normal(key, (experts, k_dim, n_dim))).astype(jnp.bfloat16)
    q4 = quantize(w, get_format("int4-g128-asym"), axis=1)
    q8 = quantize(w, get_format("int8"), axis=1)
    half = experts // 2
    mixed = [kernel.ExpertGroup(tuple(range(half)), quantize(w[:half], get_format("int4-g128-asym"), axis=1)),
             kernel.ExpertGroup(tuple(range(half, experts)), quantize(w[half:], get_format("int8"), axis=1))]
    for tokens in args.tokens:
        if all(results.has(tokens=tokens, path=p) for p in PATHS):
            continue
        t0 = time.perf_counter()
        sizes = _group_sizes(tokens, args.top_k, experts, tokens)
        x = jax.random.normal(jax.random.key(tokens), (tokens * args.top_k, k_dim), jnp.bfloat16)
        jobs = dict(zip(PATHS, [
            (lambda x, w: jax.lax.ragged_dot(x, w, sizes), [w]),
            (lambda x, w: kernel.grouped_matmul(x, sizes, w), [q4]),
            (lambda x, w: kernel.grouped_matmul(x, sizes, w), [q8]),
            # the expert ids are static: the mixed weights are closed over (ws only keeps the job's shape)
            (lambda x, _: kernel.mixed_grouped_matmul(x, sizes, mixed), [q4]),
        ]))
        timings = time_jobs([(op, x, ws) for op, ws in jobs.values()], args.reps)
        base = timings[0].seconds
        rows = []
        for (name, (op, ws)), timing in zip(jobs.items(), timings):
            out = np.asarray(op(x, ws[0]), np.float32)
            dense = _dense(mixed, experts) if name.startswith("pallas mixed") else ws[0]
            ref = np.asarray(kernel.reference(x.astype(jnp.float32), sizes, dense), np.float32)
            rows.append({"tokens": tokens, "path": name, "seconds": timing.seconds, "vs_bf16": base / timing.seconds,
                         "max_rel_err": float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)),
                         "method": timing.method})
            print(rows[-1], flush=True)
        results.add_rows(rows)
        results.set_meta(seconds=results.meta.get("seconds", 0.0) + time.perf_counter() - t0)


COLUMNS = [Column("tokens", "tokens"), Column("path", "path"),
           Column("time (us)", lambda r: 1e6 * r["seconds"], ".1f"),
           Column("vs bf16 ragged_dot", lambda r: f"{r['vs_bf16']:.2f}x"),
           Column("max rel. error", "max_rel_err", ".1e")]


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base folder>/<json name>.md`` for each run."""
    for results in runs:
        _report(results, base.parent / f"{results.path.stem}.md")


def _report(results: Results, path: Path) -> None:
    args, meta = results.args, results.meta
    device = all(r["method"] == "device" for r in results.rows)
    timing = ("device time per call (`jquant.benchmark.time_jobs`)" if device else
              "wall-clock time per call off a GPU (interpret mode: the times mean nothing)")
    lines = [f"# Grouped matmul on {meta['device']}", "",
             f"JAX {meta['jax']}; {args['experts']} experts, K={args['k']}, N={args['n']}, top-{args['top_k']}, "
             f"skewed load; {timing}. {meta['seconds']:.0f} s. {harness.reproduce(results.command)}", "",
             *harness.table(results.rows, COLUMNS)]
    harness.write_text_atomic(path, "\n".join(lines) + "\n")


def _stem(args: argparse.Namespace) -> str:
    return harness.device_stem(args, "grouped_matmul")


def _report_inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    return harness.device_report_inputs(args, path, "grouped_matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8, help="experts (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4096, help="input features (default: %(default)s)")
    parser.add_argument("--n", type=int, default=14336, help="output features (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: %(default)s)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 8192],
                        help="token counts (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs (default: %(default)s)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=_stem, key=("tokens", "path"), run=run, report=report,
                           report_inputs=_report_inputs, volatile=("tokens",),
                           quick={"experts": 4, "k": 256, "n": 128, "tokens": [16, 64], "reps": 2})


if __name__ == "__main__":
    main()
