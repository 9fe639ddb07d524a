"""Turning ``jquant.benchmark.run_benchmark`` results into a markdown report and a dispatch table."""

from __future__ import annotations

from collections import defaultdict


def _index(rows: list[dict]) -> dict:
    return {(r["case"], r["path"], r["k"], r["n"], r["m"]): r for r in rows}


PATHS = ("xla", "pallas", "native")


def dispatch_table(result: dict) -> dict:
    """``{"device", "jax", "cases": {case: {"KxN": {"m", "path", "kernel", "config"}}}}`` (lists per M).

    ``path`` is the fastest of ``"xla"`` (the dequantize fallback), ``"pallas"`` and
    ``"native"`` measured at that ``M``; ``kernel`` and ``config`` name the fastest Pallas
    kernel and its tile config.
    """
    idx = _index(result["rows"])
    cases: dict = defaultdict(dict)
    for r in result["rows"]:
        if r["path"] != "pallas":
            continue
        timed = {p: idx[(r["case"], p, r["k"], r["n"], r["m"])]["seconds"] for p in PATHS
                 if (r["case"], p, r["k"], r["n"], r["m"]) in idx}
        entry = cases[r["case"]].setdefault(f"{r['k']}x{r['n']}", {"m": [], "path": [], "kernel": [],
                                                                   "config": []})
        entry["m"].append(r["m"])
        entry["path"].append(min(timed, key=timed.get))
        entry["kernel"].append(r.get("kernel"))
        entry["config"].append(r["config"])
    return {"device": result["device"], "jax": result["jax"], "cases": dict(cases)}


def merge_tables(old: dict, new: dict) -> dict:
    """``new`` dispatch table entries over ``old`` ones: per case and shape, M values measured in
    ``new`` replace those of ``old``; the other M of ``old`` stay (entries sorted by M)."""
    cases = {c: {s: dict(e) for s, e in shapes.items()} for c, shapes in old.get("cases", {}).items()}
    for case, shapes in new.get("cases", {}).items():
        for shape, entry in shapes.items():
            rows = {}
            prev = cases.get(case, {}).get(shape)
            for src in (prev, entry):
                if not src:
                    continue
                kernels = src.get("kernel", [None] * len(src["m"]))
                for i, m in enumerate(src["m"]):
                    rows[m] = (src["path"][i], kernels[i], src["config"][i])
            ms = sorted(rows)
            cases.setdefault(case, {})[shape] = {"m": ms, "path": [rows[m][0] for m in ms],
                                                 "kernel": [rows[m][1] for m in ms],
                                                 "config": [rows[m][2] for m in ms]}
    return {"device": new.get("device", old.get("device")), "jax": new.get("jax", old.get("jax")), "cases": cases}


def _method(result: dict) -> str:
    methods = {r.get("method", "wall") for r in result["rows"]}
    if methods == {"device"}:
        return ("device time: summed GPU kernel durations per call from a jax.profiler trace (host dispatch "
                "and launch latency excluded); `span` also counts the gaps between a path's kernels.")
    return "wall clock per call (median over runs of one jit over all weight copies)."


def _config(r: dict) -> str:
    cfg = r.get("config")
    if not cfg or r["path"] != "pallas":
        return ""
    keys = (("bm", "block_m"), ("bn", "block_n"), ("bk", "block_k"), ("sk", "split_k"), ("w", "num_warps"),
            ("s", "num_stages"))
    short = " ".join(f"{a}{cfg[b]}" for a, b in keys if b in cfg)
    if cfg.get("quantize_in_kernel"):
        short += " qik"
    return f"{(r.get('kernel') or '').replace('pallas-', '')} {short}"


def markdown_report(result: dict, summary_only: bool = False) -> str:
    """Per case and shape: time, TB/s, TFLOP/s, roofline fraction and ratio to bf16 for every M."""
    c = result["ceilings"]
    lines = [f"# Kernel benchmark on {result['device']} (JAX {result['jax']})", "",
             f"Measured ceilings: HBM {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s (device copy, read + write), "
             f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s (8192^3 jnp.dot).", "",
             "`x bf16` = bf16 `jnp.dot` time / this path's time (higher is better); `roofline` = "
             "max(bytes / HBM rate, flops / dot rate) / time, int8/fp8 dots at 2x the bf16 rate.", "",
             f"Timing: {_method(result)}", "",
             "Reproduce (on the GPU): `python experiments/bench_kernels.py --sweep --out experiments/results`; "
             "`python experiments/bench_kernels.py --report-only` rebuilds this file from its JSON.", ""]
    idx = _index(result["rows"])
    kernels = [r for r in result["rows"] if r["path"] == "pallas"]
    lines += ["## Summary: Pallas kernel speed-up over bf16", "",
              "| case | K x N | " + " | ".join(f"M={m}" for m in sorted({r['m'] for r in kernels})) + " |",
              "|---|---|" + "---|" * len({r['m'] for r in kernels})]
    by_case_shape = defaultdict(dict)
    for r in kernels:
        by_case_shape[(r["case"], r["k"], r["n"])][r["m"]] = r
    ms = sorted({r["m"] for r in kernels})
    for (case, k, n), per_m in by_case_shape.items():
        cells = [f"{per_m[m]['vs_bf16']:.2f}" if m in per_m else "-" for m in ms]
        lines.append(f"| {case} | {k}x{n} | " + " | ".join(cells) + " |")
    if summary_only:
        return "\n".join(lines) + "\n"
    lines += ["", "## All paths", "",
              "| case | path | K x N | M | time (us) | span (us) | TB/s | TFLOP/s | roofline | x bf16 | x xla "
              "| kernel, config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        xla = idx.get((r["case"], "xla", r["k"], r["n"], r["m"]))
        vs_xla = f"{xla['seconds'] / r['seconds']:.2f}" if r["path"] in ("pallas", "native") and xla else ""
        span = r.get("span_seconds")
        lines.append(f"| {r['case']} | {r['path']} | {r['k']}x{r['n']} | {r['m']} | {r['seconds'] * 1e6:.1f} | "
                     f"{'' if span is None else f'{span * 1e6:.1f}'} | "
                     f"{r['tb_per_s']:.2f} | {r['tflop_per_s']:.1f} | {r['roofline_fraction']:.2f} | "
                     f"{r['vs_bf16']:.2f} | {vs_xla} | {_config(r)} |")
    return "\n".join(lines) + "\n"
