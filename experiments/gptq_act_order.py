"""GPTQ act-order on/off: KL to float, perplexity on jq-llama-small -> experiments/results/gptq_act_order.md (+ .json).

    nice -n 5 python experiments/gptq_act_order.py          # ~25 min on 2 CPU cores (3 seeds)
    python experiments/gptq_act_order.py --quick --out /tmp/ao

For each weight setting the built-in GPTQ recipes use at W4/W3 (``SETTINGS``: asymmetric groups of 128 and 64 as
``gptq-w{b}g{g}``, symmetric full-range per channel with the MSE clip search as ``gptq-w4a16``), each calibration
seed (``--seeds``, 0 1 2 by default) and ``act_order`` in (False, True), the model is quantized with GPTQ (block 128,
damping 0.01; ``act_order`` uses static groups, so the stored format is the same plain group-wise one) and its
validation perplexity, KL divergence to the float model's next-token distribution and top-1 agreement with it are
measured on the same windows. The report gives mean ± std over the seeds per setting and the change act-order makes,
paired by seed with its standard error; the verdict counts the settings where act-order moves the KL to float (the
less noisy of the two measures) by more than twice that standard error, and states the same count for perplexity.
The decision the built-in GPTQ recipes follow: act-order on by default when it lowers the mean perplexity at more
than half of the settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

# The built-in recipes' GPTQ weights at W4/W3: asymmetric groups (gptq-w{b}g{g}) and symmetric full-range per channel
# with the MSE clip search (gptq-w4a16 and the rotation / MoE / MQuant recipes); name -> (format, MSE clip search).
SETTINGS = {"int4-g128-asym": ("int4-g128-asym", False), "int4-g64-asym": ("int4-g64-asym", False),
            "int3-g128-asym": ("int3-g128-asym", False), "int3-g64-asym": ("int3-g64-asym", False),
            "int4-full-mse": ("int4-full", True), "int3-full-mse": ("int3-full", True)}
FLOAT = "float"
VALUES = ("ppl", "kl", "top1")  # what varies with the calibration draw and act-order


def run(args: argparse.Namespace, results: Results) -> None:
    """The float model once, then every (format, seed, act_order); rows already in ``results`` are skipped."""
    import jax

    import jquant as jq
    from jquant.data import load_split, random_windows, token_windows
    from jquant.eval import distribution_agreement, perplexity
    from jquant.models import load
    from jquant.recipes import Recipe, Rule
    from jquant.recipes.builtin import W4_MSE

    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, args.seq, max_windows=args.windows)
    results.set_meta(windows=len(windows), cpus=os.cpu_count(), jax=jax.__version__)
    ppl = lambda m: perplexity(m, windows, batch_size=16, progress=False).ppl  # noqa: E731
    if not results.has(format=FLOAT, seed=None, act_order=None):
        results.add({"format": FLOAT, "seed": None, "act_order": None, "ppl": ppl(loaded.model), "seconds": 0.0})
    for seed in args.seeds:
        calib = random_windows(load_split("train"), tok, args.calib, args.seq, jax.random.key(seed))
        for fmt in args.formats:
            for act_order in (False, True):
                if results.has(format=fmt, seed=seed, act_order=act_order):
                    continue
                weight, mse = SETTINGS[fmt]
                rule = Rule(pattern=r".*", weight=weight, weight_options=W4_MSE if mse else {}, algorithm="gptq",
                            options={"act_order": act_order})
                recipe = Recipe(name=f"gptq-{fmt}", description=f"{fmt}, GPTQ", rules=(rule,))
                t0 = time.perf_counter()
                qmodel = jq.quantize(loaded.model, recipe, calib, progress=False)
                seconds = time.perf_counter() - t0
                agreement = distribution_agreement(qmodel, loaded.model, windows, batch_size=16)
                results.add({"format": fmt, "seed": seed, "act_order": act_order, "ppl": ppl(qmodel),
                             "kl": agreement.kl, "top1": agreement.top1, "seconds": seconds})
                print(results.rows[-1], flush=True)


def _paired(rows: list[dict[str, Any]], fmt: str, value: str) -> dict[str, Any]:
    """Act-order on − off in ``value`` at ``fmt``, paired by seed: ``<value>_delta`` (mean), ``<value>_se`` (its
    standard error, inf from one seed), ``<value>_wins`` (seeds where act-order is lower) and ``seeds`` (pairs); empty
    where the rows lack ``value`` (a run before KL was measured)."""
    runs = {a: {r["seed"]: r[value] for r in rows
                if r["format"] == fmt and r["act_order"] is a and r.get(value) is not None} for a in (False, True)}
    paired = [on - runs[False][seed] for seed, on in runs[True].items() if seed in runs[False]]
    if not paired:
        return {}
    se = statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else float("inf")
    return {f"{value}_delta": statistics.mean(paired), f"{value}_se": se, f"{value}_wins": sum(d < 0 for d in paired),
            "seeds": len(paired)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per format: the act-order off and on rows (``off``, ``on``: mean ± std over the seeds of ``VALUES``) and the
    paired changes (:func:`_paired`) of each value."""
    merged = harness.over_seeds([r for r in rows if r["format"] != FLOAT], by=("format", "act_order"), values=VALUES)
    out = []
    for fmt in dict.fromkeys(r["format"] for r in merged):
        off, on = (next((r for r in merged if r["format"] == fmt and r["act_order"] is a), None) for a in (False, True))
        if off is not None and on is not None:
            out.append({"format": fmt, "off": off, "on": on,
                        **{k: v for value in VALUES for k, v in _paired(rows, fmt, value).items()}})
    return out


def _judgement(s: dict[str, Any]) -> str:
    """``ahead`` / ``behind`` / ``within noise``: act-order at one setting against off, by ``harness.judge`` (perplexity
    where its paired difference is beyond two standard errors, else KL where that one is)."""
    def diff(value: str) -> tuple[float, float, int] | None:
        return (s[f"{value}_delta"], s[f"{value}_se"], s["seeds"]) if f"{value}_delta" in s else None
    return harness.judge(diff("ppl"), diff("kl"))[0]


def decision(summary: list[dict[str, Any]]) -> bool:
    """Act-order on by default when it is ahead of off (:func:`_judgement`) at more settings than it is behind."""
    judgements = [_judgement(s) for s in summary]
    return judgements.count("ahead") > judgements.count("behind")


def _beyond(summary: list[dict[str, Any]], value: str, sign: int) -> list[dict[str, Any]]:
    """The settings where act-order moves ``value`` in the direction ``sign`` (-1: lower) by more than twice the
    standard error of the paired difference."""
    return [s for s in summary if sign * s[f"{value}_delta"] > 2 * s[f"{value}_se"]]


def _each(group: list[dict[str, Any]], value: str, scale: float = 1.0, unit: str = "") -> str:
    """`` (format Δ …, SE …, …)`` for the settings of ``group``, empty when there are none."""
    return (" (" + ", ".join(f"{s['format']} Δ {scale * s[f'{value}_delta']:+.3f}{unit}, SE "
                             f"{scale * s[f'{value}_se']:.3f}{unit}" for s in group) + ")") if group else ""


def _verdict(summary: list[dict[str, Any]]) -> str:
    """The act-order claim (GPTQ's columns in decreasing Hessian-diagonal order lower the error), judged on the KL
    divergence to the float model (perplexity for a run without it): ``reproduced`` when the paired Δ is below minus
    twice its standard error at every setting, ``partly reproduced`` at some, ``not reproduced`` at none; the same
    count for perplexity is stated beside it."""
    value = "kl" if all("kl_delta" in s for s in summary) else "ppl"
    scale, unit, name = (1e3, "e-3", "KL divergence to the float model") if value == "kl" else (1.0, "", "perplexity")
    lower, higher = _beyond(summary, value, -1), _beyond(summary, value, 1)
    category = ("reproduced" if len(lower) == len(summary) else "partly reproduced" if lower else "not reproduced")
    seeds = max(s["seeds"] for s in summary)
    text = (f"{category}: act-order lowers GPTQ's {name} by more than twice the paired standard error at {len(lower)} "
            f"of {len(summary)} settings{_each(lower, value, scale, unit)} and raises it by that much at "
            f"{len(higher)}{_each(higher, value, scale, unit)}; the other {len(summary) - len(lower) - len(higher)} "
            f"are within noise ({seeds} seeds).")
    if value == "kl":
        text += (f" Perplexity, by the same rule: lower at {len(_beyond(summary, 'ppl', -1))}, higher at "
                 f"{len(_beyond(summary, 'ppl', 1))} of {len(summary)}.")
    return text


def _delta(value: str, scale: float = 1.0) -> Callable[[dict[str, Any]], str | None]:
    """A :class:`Column` key: the paired change of ``value`` (times ``scale``) ± its standard error (the change
    alone from one seed)."""
    def cell(s: dict[str, Any]) -> str | None:
        if f"{value}_delta" not in s:
            return None
        se = f" ± {scale * s[f'{value}_se']:.3f}" if s["seeds"] > 1 else ""
        return f"{scale * s[f'{value}_delta']:+.3f}{se}"
    return cell


def _side(value: str, side: str, fmt: str, scale: float = 1.0) -> Callable[[dict[str, Any]], str | None]:
    """A :class:`Column` key: the ``side`` (``off`` / ``on``) row's ``value`` as mean ± std over the seeds."""
    return lambda s: harness.mean_std(value, fmt, scale)(s[side])


COLUMNS = [Column("weights", "format"), Column("seeds", "seeds"),
           Column("ppl off", _side("ppl", "off", ".3f")), Column("ppl on", _side("ppl", "on", ".3f")),
           Column("Δppl ± SE", _delta("ppl")),
           Column("KL off (1e-3 nats)", _side("kl", "off", ".3f", 1e3)),
           Column("KL on (1e-3 nats)", _side("kl", "on", ".3f", 1e3)), Column("ΔKL ± SE (1e-3)", _delta("kl", 1e3)),
           Column("top-1 off", _side("top1", "off", ".4f")), Column("top-1 on", _side("top1", "on", ".4f")),
           Column("wins ppl / KL", lambda s: f"{s['ppl_wins']}/{s['seeds']} / "
                  + (f"{s['kl_wins']}/{s['seeds']}" if "kl_wins" in s else "–"))]


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md`` from the saved rows."""
    results = runs[0]
    rows, meta, args = results.rows, results.meta, results.args
    summary = summarize(rows)
    fp = next((r["ppl"] for r in rows if r["format"] == FLOAT), None)
    better = {v: [s["format"] for s in summary if s.get(f"{v}_delta", 0.0) < 0] for v in ("ppl", "kl")}
    kl_line = (f"- Act-order lowers the mean KL to float at {len(better['kl'])} of {len(summary)} settings"
               f"{' (' + ', '.join(better['kl']) + ')' if better['kl'] else ''}."
               if all("kl_delta" in s for s in summary) else "- This run did not measure the KL to float.")
    lines = [f"# GPTQ activation order on {args['model']}", "",
             f"{args['model']}: validation perplexity, KL divergence from the float model's next-token distribution "
             "(1e-3 nats per token) and top-1 agreement with it, all on the same "
             f"{meta.get('windows')} windows of {args['seq']} tokens (float perplexity {fp:.3f}); GPTQ (block 128, "
             f"damping 0.01) on every linear, calibrated on {args['calib']} random {args['seq']}-token train windows "
             f"per seed (seeds {', '.join(map(str, args['seeds']))}); act-order uses static groups. Mean ± std over "
             "the seeds; Δ = act-order on − off, paired by seed, ± the standard error of its mean; wins = seeds "
             f"where act-order is lower. {meta.get('cpus')} CPU cores, jax {meta.get('jax')}.", "",
             *harness.table(summary, COLUMNS), "",
             *([harness.verdict(_verdict(summary)), ""] if summary else []),
             f"- Act-order lowers the mean perplexity at {len(better['ppl'])} of {len(summary)} settings"
             f"{' (' + ', '.join(better['ppl']) + ')' if better['ppl'] else ''}.", kl_line,
             "- Per setting, act-order against off (perplexity where the paired difference is beyond two standard "
             "errors, else KL where that one is): " + ", ".join(f"{s['format']} {_judgement(s)}" for s in summary)
             + ".",
             f"- Decision (on when act-order is ahead at more settings than it is behind): the built-in GPTQ recipes "
             f"use act_order={decision(summary)}.", "", harness.reproduce(results.command), ""]
    harness.write_text_atomic(base.with_suffix(".md"), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="weight settings (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows per seed (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=32, help="validation windows (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per window (default: %(default)s)")
    harness.add_arguments(parser, model="jq-llama-small", seeds=(0, 1, 2))
    harness.run_experiment(parser, stem=lambda a: "gptq_act_order", key=("format", "seed", "act_order"), run=run,
                           report=report, quick={"formats": ["int4-g64-asym"], "calib": 4, "windows": 4,
                                                 "seeds": [0, 1], "model": "jq-llama-tiny"})


if __name__ == "__main__":
    main()
