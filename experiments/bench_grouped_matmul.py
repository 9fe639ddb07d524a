"""Grouped (MoE expert) matmul: bf16 ``ragged_dot`` vs the Pallas grouped kernel (int4 g128, int8 per channel)
and MxMoE's mixed-precision call (half the experts int4, half int8), on MoE layer shapes.

    python experiments/bench_grouped_matmul.py                       # GPU: Mixtral-like shapes, device time
    python experiments/bench_grouped_matmul.py --tiny --reps 2       # CPU smoke run (interpret mode, no timing value)

Tokens are routed to experts with a skewed (Zipf-like) load, ``tokens * top_k`` rows in all. Each row of the table
prints the time per call, the ratio to bf16 ``ragged_dot`` measured in the same run, and the kernel's largest
relative error against its float32 reference. Results go to ``experiments/results/grouped_matmul_<gpu>.md``.
No figure in this file has been measured yet: it needs a GPU (issue 8 closing note).
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jquant.benchmark import time_jobs
from jquant.formats import get_format, quantize
from jquant.pallas_kernels import grouped_matmul as kernel

RESULTS = Path(__file__).resolve().parent / "results"


def _group_sizes(tokens: int, top_k: int, experts: int, seed: int) -> jnp.ndarray:
    share = 1.0 / np.arange(1, experts + 1) ** 0.8
    share = np.random.default_rng(seed).permutation(share / share.sum())
    sizes = np.floor(share * tokens * top_k).astype(np.int32)
    sizes[0] += tokens * top_k - sizes.sum()
    return jnp.asarray(sizes)


def run(args) -> list[str]:
    experts, k_dim, n_dim = (4, 256, 128) if args.tiny else (args.experts, args.k, args.n)
    rows = ["| tokens | path | time (us) | vs bf16 ragged_dot | max rel. error |", "|---|---|---|---|---|"]
    key = jax.random.key(0)
    w = (0.02 * jax.random.normal(key, (experts, k_dim, n_dim))).astype(jnp.bfloat16)
    q4 = quantize(w, get_format("int4-g128-asym"), axis=1)
    q8 = quantize(w, get_format("int8"), axis=1)
    half = experts // 2
    mixed = [kernel.ExpertGroup(tuple(range(half)), quantize(w[:half], get_format("int4-g128-asym"), axis=1)),
             kernel.ExpertGroup(tuple(range(half, experts)), quantize(w[half:], get_format("int8"), axis=1))]
    for tokens in ((16, 64) if args.tiny else args.tokens):
        sizes = _group_sizes(tokens, args.top_k, experts, tokens)
        x = jax.random.normal(jax.random.key(tokens), (tokens * args.top_k, k_dim), jnp.bfloat16)
        jobs = {
            "bf16 ragged_dot": (lambda x, w: jax.lax.ragged_dot(x, w, sizes), [w]),
            "pallas int4 g128": (lambda x, w: kernel.grouped_matmul(x, sizes, w), [q4]),
            "pallas int8": (lambda x, w: kernel.grouped_matmul(x, sizes, w), [q8]),
            # the expert ids are static: the mixed weights are closed over (ws only keeps the job's shape)
            "pallas mixed int4/int8": (lambda x, _: kernel.mixed_grouped_matmul(x, sizes, mixed), [q4]),
        }
        timings = time_jobs([(op, x, ws) for op, ws in jobs.values()], args.reps)
        base = timings[0].seconds
        for (name, (op, ws)), timing in zip(jobs.items(), timings):
            out = np.asarray(op(x, ws[0]), np.float32)
            dense = _dense(mixed, experts) if name.startswith("pallas mixed") else ws[0]
            ref = np.asarray(kernel.reference(x.astype(jnp.float32), sizes, dense), np.float32)
            err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
            rows.append(f"| {tokens} | {name} | {1e6 * timing.seconds:.1f} | {base / timing.seconds:.2f}x | {err:.1e} |")
            print(rows[-1], flush=True)
    return rows


def _dense(groups, experts: int) -> jnp.ndarray:
    """The float [E, K, N] stack a mixed call multiplies (each group dequantized into its experts' slots)."""
    parts = {}
    for ids, weights in groups:
        for i, e in enumerate(ids):
            parts[e] = weights.dequantize(jnp.float32)[i]
    return jnp.stack([parts[e] for e in range(experts)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 8192])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run (interpret mode)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args)
    device = jax.devices()[0].device_kind.lower().replace(" ", "_")
    if jax.default_backend() == "gpu":
        header = [f"# Grouped matmul on {jax.devices()[0].device_kind}", "",
                  f"JAX {jax.__version__}; {args.experts} experts, K={args.k}, N={args.n}, top-{args.top_k}, skewed "
                  f"load; device time per call (`jquant.benchmark.time_jobs`). {time.perf_counter() - t0:.0f} s.", ""]
        (RESULTS / f"grouped_matmul_{device}.md").write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
