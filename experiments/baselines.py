"""Quantization baselines on a bundled reference model -> experiments/results/baselines.md (+ .json).

    python experiments/baselines.py                        # jq-llama-small, all recipes
    python experiments/baselines.py --model jq-llama-small --windows 160 --items 200 --calib 64  # ~60 min, 2 cores
    python experiments/baselines.py --quick --out /tmp/b   # smoke run: jq-llama-tiny, 2 recipes, a few windows
    python experiments/baselines.py --report-only          # rebuild baselines.md from baselines.json

RTN vs GPTQ at W8, W4 g128, W3 g128 and W2 g64 (asymmetric), fp8 / NVFP4 /
MXFP4 weight-only and W8A8 (int8 and fp8), all with embeddings and lm_head
kept in bf16. Calibration: 128 random 256-token windows of the train split
(key: the seed; seeds 0 1 2 by default, the table shows mean ± std over them for the rows that calibrate).
Evaluation: validation perplexity (256-token windows), KL divergence to the float model's next-token distribution
and top-1 agreement with it on the same windows, and zero-shot accuracy on the test split. Size counts every stored array (codes, scales,
zero points) plus the float embeddings and head.

A baselines.json of the older layout (a bare list of rows) does not record its arguments: rebuild its
report with the arguments it was run with, e.g. ``--report-only --windows 160 --items 200 --calib 64``.
"""

import argparse
import itertools
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

# jax and jquant are imported where they are used: --help and --report-only need neither.
RECIPES = ["rtn-w8", "gptq-w8", "rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128", "rtn-w2g64", "gptq-w2g64",
           "fp8-w8a16", "nvfp4-w4a16", "mxfp4-w4a16", "rtn-w8a8", "rtn-w8a8-static", "fp8-w8a8"]
FLOAT = "float (bf16)"
TASKS = ("next_line", "same_source")
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
VALUES = ("ppl", "kl", "top1", *TASKS, "seconds")  # what varies with the calibration draw
COLUMNS = [Column("recipe", "recipe"), Column("seeds", lambda r: len(r["seeds"])),
           Column("ppl", harness.mean_std("ppl", ".2f")), Column("KL (1e-3 nats)", harness.mean_std("kl", ".2f", 1e3)),
           Column("top-1", harness.mean_std("top1", ".4f")), Column("next_line", harness.mean_std("next_line", ".3f")),
           Column("same_source", harness.mean_std("same_source", ".3f")), Column("size (MB)", "mb", ".2f"),
           Column("bits/param", "bits", ".2f"), Column("time (s)", "seconds", ".1f")]


def evaluate(model, reference, tokenizer, windows, n_items: int) -> dict[str, Any]:
    """Perplexity, KL to ``reference`` (the float model) and top-1 agreement with it, zero-shot accuracy per task,
    total size and the float / quantized parts of it."""
    import jquant as jq
    from jquant.eval import distribution_agreement, perplexity, zero_shot

    agreement = distribution_agreement(model, reference, windows, batch_size=16)
    size = jq.size_report(model)
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    quantized = [r for r in size.rows if r[3] not in FLOAT_DTYPES]
    return {"ppl": perplexity(model, windows, batch_size=16, progress=False).ppl, "kl": agreement.kl,
            "top1": agreement.top1,
            **{t: zs[t].accuracy for t in TASKS}, "mb": size.megabytes, "bits": size.bits_per_parameter,
            "float_mb": sum(r[2] for r in size.rows if r[3] in FLOAT_DTYPES) / 1e6,
            "float_params": sum(r[1] for r in size.rows if r[3] in FLOAT_DTYPES), "params": size.parameters,
            "linear_bits": 8 * sum(r[2] for r in quantized) / sum(r[1] for r in quantized) if quantized else None}


def run(args: argparse.Namespace, results: Results) -> None:
    """Evaluate the float model once, then every recipe per seed (once for a recipe that does not calibrate); rows
    already in ``results`` are skipped."""
    import jax

    import jquant as jq
    from jquant.data import load_split, random_windows, token_windows
    from jquant.models import load

    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    results.set_meta(windows=len(windows), platform=jax.devices()[0].platform, cpus=os.cpu_count())
    if not results.has(recipe=FLOAT, seed=None):
        results.add({"recipe": FLOAT, "seed": None, "seconds": 0.0, **evaluate(loaded.model, loaded.model, tok, windows,
                                                                                    args.items)})
        print(results.rows[-1], flush=True)
    for seed in args.seeds:
        calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(seed))
        results.set_meta(calib=len(calib))
        for name in args.recipes:
            if results.has(recipe=name, seed=seed) or (seed != args.seeds[0] and not jq.needs_calibration(loaded.model, name)):
                continue  # done, or a recipe that does not calibrate: its first seed's row stands for all
            t0 = time.perf_counter()
            qmodel = jq.quantize(loaded.model, name, calib, progress=False)
            seconds = time.perf_counter() - t0
            results.add({"recipe": name, "seed": seed, "seconds": seconds,
                         **evaluate(qmodel, loaded.model, tok, windows, args.items)})
            print(results.rows[-1], flush=True)


def _gptq_vs_rtn(rows: list[dict], fp: dict) -> list[str]:
    """A bullet and an indented table: perplexity increase over float and KL to float of RTN and GPTQ at each width
    both ran (``rows``: one per recipe, mean ± std over seeds)."""
    pairs = [(r, g) for r in rows for g in rows if r["recipe"].startswith("rtn-") and g["recipe"] == "gptq-" + r["recipe"][4:]]
    if not pairs:
        return []
    wins = [r["recipe"][4:] for r, g in pairs if g["ppl"] < r["ppl"]]
    rise = [{**r, "ppl": r["ppl"] - fp["ppl"]} for pair in pairs for r in pair]
    columns = [Column("width", lambda p: p[0]["recipe"][4:]),
               Column("RTN ppl", lambda p: harness.mean_std("ppl", "+.2f")(p[0])),
               Column("GPTQ ppl", lambda p: harness.mean_std("ppl", "+.2f")(p[1])),
               Column("RTN KL (1e-3)", lambda p: harness.mean_std("kl", ".2f", 1e3)(p[0])),
               Column("GPTQ KL (1e-3)", lambda p: harness.mean_std("kl", ".2f", 1e3)(p[1]))]
    return [f"- GPTQ has the lower mean perplexity at {len(wins)} of {len(pairs)} widths ({', '.join(wins) or 'none'}); "
            "increase over float (RTN does not calibrate: one run) and KL to float:", "",
            *(f"  {line}" for line in harness.table(list(zip(rise[::2], rise[1::2])), columns)), ""]


def _bits(recipe: str) -> int:
    """The weight bits of a recipe name (``rtn-w4g128`` -> 4)."""
    return int(re.search(r"-w(\d+)", recipe).group(1))


def _verdict(rows: list[dict], fp: dict) -> str | None:
    """The GPTQ paper's claim against RTN: ``reproduced`` when GPTQ's perplexity is below RTN's at every width below
    8 bits on every calibration seed and the mean gap widens as the bits fall, ``partly reproduced`` when it is below
    at some widths, ``not reproduced`` at none (RTN does not calibrate: its row, or the mean of its rows, stands for
    every seed; ``rows``: one per recipe and seed)."""
    widths = [r["recipe"][4:] for r in rows if r["recipe"].startswith("rtn-") and _bits(r["recipe"]) < 8]
    widths = [w for w in dict.fromkeys(widths) if any(g["recipe"] == "gptq-" + w for g in rows)]
    if not widths:
        return None
    widths.sort(key=lambda w: -_bits("-" + w))
    runs = {w: ([r["ppl"] for r in rows if r["recipe"] == "rtn-" + w], [g["ppl"] for g in rows if g["recipe"] == "gptq-" + w])
            for w in widths}
    rise = {w: (statistics.mean(rtn) - fp["ppl"], statistics.mean(gptq) - fp["ppl"]) for w, (rtn, gptq) in runs.items()}
    wins = [w for w, (rtn, gptq) in runs.items() if max(gptq) < statistics.mean(rtn)]
    gaps = [rtn - gptq for rtn, gptq in rise.values()]
    widens = all(a <= b for a, b in itertools.pairwise(gaps))
    category = ("reproduced" if len(wins) == len(widths) and widens else "partly reproduced" if wins
                else "not reproduced")
    seeds = min(len(gptq) for _, gptq in runs.values())
    return (f"{category}: GPTQ's perplexity increase over float is below RTN's at {len(wins)} of {len(widths)} widths "
            "below 8 bits (" + ", ".join(f"{w} {gptq:+.2f} vs {rtn:+.2f}" for w, (rtn, gptq) in rise.items())
            + f"; GPTQ on every one of {seeds} calibration seed{'s' * (seeds > 1)}) and the gap "
            f"{'widens' if widens else 'does not widen'} as the bits fall (the GPTQ paper: GPTQ below RTN at the same "
            "width, by more at fewer bits).")


def notes(rows: list[dict], args: dict, meta: dict) -> list[str]:
    """The reading of the table (markdown lines; ``rows``: one per recipe), every number formatted from the run."""
    fp = next(r for r in rows if r["recipe"] == FLOAT)
    quantized = [r for r in rows if r["recipe"] != FLOAT]
    out = []
    q = next((r for r in quantized if "float_mb" in r), None)
    if q is not None:
        per_weight = ", ".join(f"{r['recipe']} {r['linear_bits']:.3f}" for r in quantized if r.get("linear_bits"))
        out.append(f"- Sizes include the float embedding, head and norms: {q['float_params'] / 1e6:.1f} M of the "
                   f"{q['params'] / 1e6:.1f} M parameters, {q['float_mb']:.2f} MB. Bits per quantized weight "
                   f"(codes, scales, zero points): {per_weight}.")
    out += _gptq_vs_rtn(quantized, fp)
    if quantized:
        worst = max(quantized, key=lambda r: r["ppl"])
        out.append(f"- Largest perplexity increase over float: {worst['recipe']}, {worst['ppl'] - fp['ppl']:+.2f} "
                   f"({100 * (worst['ppl'] / fp['ppl'] - 1):.1f} %).")
        if all(r.get("kl") is not None for r in quantized):
            order = sorted(quantized, key=lambda r: r["kl"])
            swaps = sum(a["ppl"] > b["ppl"] for a, b in itertools.combinations(order, 2))
            out.append(f"- KL to float orders the {len(order)} recipes from {order[0]['recipe']} "
                       f"({1e3 * order[0]['kl']:.3f}e-3) to {order[-1]['recipe']} ({1e3 * order[-1]['kl']:.1f}e-3); "
                       f"perplexity orders {swaps} of the {len(order) * (len(order) - 1) // 2} pairs the other way.")
    shift = max((abs(r[t] - fp[t]) for r in quantized for t in TASKS), default=0.0)
    out.append(f"- The largest zero-shot change from float is {shift:.3f}; two binomial standard errors at "
               f"{args['items']} items are about ±{2 * (0.25 / args['items']) ** 0.5:.3f}.")
    where = f" on {meta['platform'].upper()} ({meta['cpus']} cores)" if "platform" in meta else ""
    out.append(f"- Times are wall seconds{where}; GPTQ's include the block-by-block calibration forward over "
               f"{meta['calib']} × 256 tokens.")
    return out


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md`` from the results."""
    results = runs[0]
    args, meta = results.args, results.meta
    rows = harness.over_seeds(results.rows, by=("recipe",), values=VALUES)
    lines = [f"# Quantization baselines on {args['model']}", "",
             f"Validation perplexity over {meta['windows']} windows of 256 tokens, KL divergence from the float model's "
             "next-token distribution (1e-3 nats per token) and top-1 agreement with it on the same windows; "
             "mean ± std over the calibration seeds "
             f"{', '.join(map(str, args.get('seeds', [0])))} for the recipes that calibrate; zero-shot accuracy on "
             f"{args['items']} items per task (test split; chance: next_line 0.25, same_source 0.33); size of all "
             "parameters (embeddings and lm_head stay bf16); GPTQ calibrated on "
             f"{meta['calib']} random 256-token train windows. {harness.reproduce(results.command)}", "",
             *harness.table(rows, COLUMNS), ""]
    fp = next((r for r in results.rows if r["recipe"] == FLOAT), None)
    verdict = _verdict([r for r in results.rows if r["recipe"] != FLOAT], fp) if fp else None
    lines += [*([harness.verdict(verdict), ""] if verdict else []), "Reading the table:", *notes(rows, args, meta)]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def legacy(data: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """The older layout (a bare list of rows, no arguments): arguments from this invocation, command rebuilt."""
    command = (f"python experiments/baselines.py --model {args.model}"
               f"{f' --windows {args.windows}' if args.windows else ''} --items {args.items} --calib {args.calib}")
    rows = [{**r, "seed": None if r["recipe"] == FLOAT else 0} for r in data]
    return {"script": "baselines", "command": command, "args": harness.run_args(args), "key": ["recipe", "seed"],
            "meta": {"windows": args.windows, "calib": args.calib}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=None, help="validation windows (default: the whole split)")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=128, help="calibration windows (default: %(default)s)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES, metavar="RECIPE",
                        help="recipes to run (default: all of %(choices)s)")
    harness.add_arguments(parser, model="jq-llama-small", seeds=[0, 1, 2])
    harness.run_experiment(
        parser, stem=lambda a: f"baselines{'-' + a.model if a.model != 'jq-llama-small' else ''}",
        key=("recipe", "seed"), run=run, report=report, legacy=legacy,
        quick={"model": "jq-llama-tiny", "windows": 2, "items": 8, "calib": 4, "recipes": ["rtn-w2g64", "gptq-w2g64"]})


if __name__ == "__main__":
    main()
