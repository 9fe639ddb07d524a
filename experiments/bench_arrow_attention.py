"""Head-wise arrow attention (DiTFastAttnV2, issue 26): the tile-skipping Pallas kernel vs dense attention
-> experiments/results/arrow_attention_<gpu>.md (+ .json).

    python experiments/bench_arrow_attention.py                     # GPU: SD3/Flux-like joint attention, device time
    python experiments/bench_arrow_attention.py --report-only       # rebuild the .md from the .json
    python experiments/bench_arrow_attention.py --smoke             # CPU smoke run (interpret mode, tiny, temp folder)

Cases: SD3-like (24 heads x 64, text last) and Flux-like (24 heads x 128, text first), ``--image`` image tokens
plus ``--text`` text tokens, batch ``--batch``, bfloat16. Window tables: every head dense (-1); every head an
arrow of factor k in {8, 16, 32} (half-width ``w = n_image // (2 k)``, spec §3.1); a seeded mixed table of
-1 / 0 (skipped) / k = 8, 16, 32 heads. Each row gives the time per call, its ratio to XLA's dense attention
(``jax.nn.dot_product_attention``) and to the dense Pallas flash kernel (``jax.experimental.pallas.ops.gpu.
attention.mha`` on the sequence padded to its tile), both measured in the same run, the fraction of (query tile,
KV tile) pairs the kernel visits (``arrow_tile_count``: the ideal time ratio to its own dense table), and the
kernel's largest error relative to the float32 reference. Figures are GPU-only: off a GPU only ``--smoke``
(alias of ``--quick``) runs, and it writes to a temporary folder unless ``--out`` is given.
No figure in this file has been measured yet.
"""

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import harness
from harness import Column, Results

# jax and jquant are imported where they are used: --help and --report-only need neither.
CASES = {"sd3": (64, "last"), "flux": (128, "first")}  # head dim, text position
FACTORS = (8, 16, 32)
DENSE_PATHS = ("xla dense", "pallas dense (jax mha)")


def window_tables(n_image: int, heads: int, seed: int) -> dict:
    """Name -> ``[H]`` int32 window table (module docstring)."""
    import numpy as np

    tables = {"dense": np.full(heads, -1, np.int32)}
    for k in FACTORS:
        tables[f"k{k}"] = np.full(heads, max(1, n_image // (2 * k)), np.int32)
    choices = [-1, 0] + [max(1, n_image // (2 * k)) for k in FACTORS]
    tables["mixed"] = np.random.default_rng(seed).choice(choices, size=heads).astype(np.int32)
    return tables


def _dense_ops(args, d: int, interpret: bool) -> dict:
    """XLA's and Pallas's dense attention as ``op(qkv, _)`` (the Pallas one on the sequence padded to its tile,
    padding masked by segment ids)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    block = args.dense_block

    def pallas_dense(qkv, _):
        b, s = qkv[0].shape[:2]
        extra = -s % block
        padded = [jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in qkv]
        # padded keys sit in their own segment, so real queries ignore them (masking every tile: only when padded)
        segments = jnp.broadcast_to((jnp.arange(s + extra) >= s).astype(jnp.int32), (b, s + extra)) if extra else None
        out = pallas_attention.mha(*padded, segments, sm_scale=d**-0.5, interpret=interpret,
                                   block_sizes=pallas_attention.BlockSizes(block_q=block, block_k=block))
        return out[:, :s]

    return {DENSE_PATHS[0]: lambda qkv, _: jax.nn.dot_product_attention(*qkv, implementation="xla"),
            DENSE_PATHS[1]: pallas_dense}


def run(args: argparse.Namespace, results: Results) -> None:
    """Time the dense paths and the kernel on every window table of each case not already in ``results``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jquant.benchmark import time_jobs
    from jquant.pallas_kernels._common import interpret_mode

    kernel = importlib.import_module("jquant.pallas_kernels.arrow_attention")

    if jax.default_backend() != "gpu" and not args.quick:
        raise SystemExit(f"the JAX backend is {jax.default_backend()!r}: the figures are GPU-only. Run on a GPU, or "
                         "pass --smoke for a smoke run (interpret mode, tiny sizes, no timing value)")
    interpret = interpret_mode()
    results.set_meta(device=jax.devices()[0].device_kind, jax=jax.__version__)
    s = args.image + args.text
    for case in args.cases:
        d, where = CASES[case]
        start = 0 if where == "first" else args.image
        warps = args.num_warps or (4 if d <= 64 else 8)
        cfg = kernel.ArrowConfig(args.block_q, args.block_k, warps, args.num_stages)
        tables = window_tables(args.image, args.heads, args.seed)
        if all(results.has(case=case, table=t, path="pallas arrow") for t in tables):
            continue
        t0 = time.perf_counter()
        keys = jax.random.split(jax.random.key(len(case)), 3)
        qkv = tuple(jax.random.normal(kk, (args.batch, s, args.heads, d), jnp.bfloat16) for kk in keys)

        def arrow(qkv, w):
            return kernel.arrow_attention(*qkv, w, n_text=args.text, text_start=start, config=cfg, interpret=interpret)

        dense_ops = _dense_ops(args, d, interpret)
        jobs = [(op, qkv, [None]) for op in dense_ops.values()]
        jobs += [(arrow, qkv, [jnp.asarray(w)]) for w in tables.values()]
        timings = time_jobs(jobs, args.reps)
        xla_s, pallas_s = timings[0].seconds, timings[1].seconds
        qkv32 = tuple(x.astype(jnp.float32) for x in qkv)

        def error(out, w):
            ref = np.asarray(kernel.arrow_attention_reference(*qkv32, w, args.text, start))
            return float(np.abs(np.asarray(out, np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30))

        rows = [{"case": case, "table": "-", "path": p, "seconds": t.seconds, "vs_xla": xla_s / t.seconds,
                 "vs_pallas": pallas_s / t.seconds, "max_rel_err": error(op(qkv, None), tables["dense"]),
                 "method": t.method} for (p, op), t in zip(dense_ops.items(), timings)]
        full_tiles = -(-s // cfg.block_q) * -(-s // cfg.block_k) * args.heads
        dense_kernel_s = timings[2].seconds
        for (name, w), timing in zip(tables.items(), timings[2:]):
            rows.append({"case": case, "table": name, "windows": w.tolist(), "path": "pallas arrow",
                         "num_warps": warps, "seconds": timing.seconds, "vs_xla": xla_s / timing.seconds,
                         "vs_pallas": pallas_s / timing.seconds, "vs_own_dense": dense_kernel_s / timing.seconds,
                         "tile_fraction": float(kernel.arrow_tile_count(w, args.text, start, s, cfg.block_q,
                                                                 cfg.block_k).sum() / full_tiles),
                         "max_rel_err": error(arrow(qkv, jnp.asarray(w)), w),
                         "method": timing.method})
        for row in rows:
            print(row, flush=True)
        results.add_rows(rows)
        results.set_meta(seconds=results.meta.get("seconds", 0.0) + time.perf_counter() - t0)


COLUMNS = [Column("case", "case"), Column("window table", "table"), Column("path", "path"),
           Column("time (us)", lambda r: 1e6 * r["seconds"], ".1f"),
           Column("vs XLA dense", lambda r: f"{r['vs_xla']:.2f}x"),
           Column("vs Pallas dense", lambda r: f"{r['vs_pallas']:.2f}x"),
           Column("vs own dense table", lambda r: f"{r['vs_own_dense']:.2f}x" if "vs_own_dense" in r else None),
           Column("tiles visited", "tile_fraction", ".3f"),
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
    lines = [f"# Arrow attention on {meta['device']}", "",
             f"JAX {meta['jax']}; batch {args['batch']}, {args['image']} image + {args['text']} text tokens, "
             f"{args['heads']} heads, bfloat16; kernel tiles {args['block_q']}x{args['block_k']}, dense Pallas tile "
             f"{args['dense_block']}; {timing}. {meta['seconds']:.0f} s. {harness.reproduce(results.command)}", "",
             "`tiles visited`: the kernel's (query tile, KV tile) pairs over all pairs (the ideal time ratio to the "
             "dense table); `vs ...`: time ratios measured in this run (> 1: faster).", "",
             *harness.table(results.rows, COLUMNS)]
    harness.write_text_atomic(path, "\n".join(lines) + "\n")


def _stem(args: argparse.Namespace) -> str:
    return harness.device_stem(args, "arrow_attention")


def _report_inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    return harness.device_report_inputs(args, path, "arrow_attention")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["sd3", "flux"],
                        help="sd3: D=64, text last; flux: D=128, text first (default: %(default)s)")
    parser.add_argument("--image", type=int, default=4096, help="image tokens (default: %(default)s)")
    parser.add_argument("--text", type=int, default=333, help="text tokens (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=24, help="heads (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch (default: %(default)s)")
    parser.add_argument("--block-q", type=int, default=64, help="kernel query tile (default: %(default)s)")
    parser.add_argument("--block-k", type=int, default=64, help="kernel KV tile (default: %(default)s)")
    parser.add_argument("--num-warps", type=int, default=None, help="kernel warps (default: 4 for D <= 64, else 8)")
    parser.add_argument("--num-stages", type=int, default=2, help="kernel pipeline stages (default: %(default)s)")
    parser.add_argument("--dense-block", type=int, default=128, help="dense Pallas tile (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed table (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs (default: %(default)s)")
    parser.add_argument("--smoke", dest="quick", action="store_true", help="alias of --quick")
    harness.add_arguments(parser)
    smoke = any(a in ("--smoke", "--quick") for a in argv[1:])
    if smoke and not any(a.split("=", 1)[0] == "--out" for a in argv[1:]):
        import jax

        if jax.default_backend() != "gpu":  # never put CPU figures beside the GPU results
            out = tempfile.mkdtemp(prefix="arrow_attention_smoke_")
            print(f"backend {jax.default_backend()!r}: figures are GPU-only; the smoke run writes to {out}")
            parser.set_defaults(out=Path(out))
    harness.run_experiment(parser, stem=_stem, key=("case", "table", "path"), run=run, report=report,
                           report_inputs=_report_inputs, argv=argv,
                           quick={"image": 56, "text": 9, "heads": 4, "block_q": 16, "block_k": 16,
                                  "dense_block": 16, "reps": 1})


if __name__ == "__main__":
    main()
