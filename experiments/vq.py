"""Vector quantization at 2-3 bits per weight on a bundled model -> experiments/results/vq.md (+ .json).

    python experiments/vq.py                                   # jq-llama-small, everything: ~2 h on 2 CPU cores
    python experiments/vq.py --windows 160 --items 200 --calib 64 --seeds 0 1 2
    python experiments/vq.py --quick --out /tmp/vq             # smoke run: a few windows and items, seeds 0 1
    python experiments/vq.py --report-only                     # rebuild vq.md from vq.json

At about 2, 2.25 and 3 bits per weight: RTN and GPTQ (asymmetric integers, fp16 scales, uint8
zero points), GPTQ after random-Hadamard rotations (``GPTQ + RHT``: QuaRot's offline rotations and the online one
before ``down_proj``, so every linear's input is Hadamard-rotated, as PCDVQ's own transform does), GPTVQ-style VQ
and PCDVQ (recipes ``gptvq-w*`` / ``pcdvq-w*``), plus at 2 bits PCDVQ with nearest rounding (no Hessian) and
PCDVQ and GPTQ each followed by end-to-end fine-tuning of their continuous parameters (scales and norm gains, codes
frozen; ``jquant.finetune.tune_continuous``, spec §3.6 step 2, ``--tune-steps`` Adam steps on the calibration
windows, KL to the float model). Every recipe that calibrates runs once per calibration
seed (``--seeds``, 0 1 2 by default: each draws its own random 256-token train windows; the table
shows mean ± std over them), the others once. Columns: validation perplexity (256-token windows),
KL divergence to the float model's next-token distribution and top-1 agreement with it on the same
windows, zero-shot accuracy (test split), bits per weight of the quantized linears counting every
stored array (codes, scales, zero points, per-group codebooks) and PCDVQ's shared codebooks once per
model, bits per parameter of the whole model (bf16 embeddings and head included), and the
quantization time (calibration forward and fine-tuning included; CPU). A plot puts KL and perplexity against
bits per weight for every method.

Sensitivity (the paper's motivation experiment): every linear with only the directions
quantized (exact norms) or only the magnitudes (exact directions), PCD nearest rounding after
the random Hadamard transform, at two codebook sizes (no calibration: one run). Rows are saved as
they finish (``--resume`` keeps them); the older json layout is read too (one calibration seed, no
KL or top-1).
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

import harness
import jquant as jq
from jquant.algorithms.pcdvq import simulate_parts
from jquant.data import load_split, random_windows, token_windows
from harness import Column, Results
from jquant.eval import distribution_agreement, perplexity, zero_shot
from jquant.finetune.continuous import ContinuousTuneConfig, tune_continuous
from jquant.formats import PolarVQFormat
from jquant.models import load
from jquant.recipes import Recipe, Rule, TransformStep
from jquant.sites import find_sites

TASKS = ("next_line", "same_source")
INT = {"w2": "int2-g128-asym", "w2.25": "int2-g64-asym", "w3": "int3-g128-asym"}
SENSITIVITY = ((14, 2), (8, 1))  # (direction bits, magnitude bits) with k = 8
FLOAT = "float (bf16)"
TUNED = " + fine-tuning"  # a method name ending so is its base method's model, then ``tune_continuous``
RHT = (TransformStep("quarot", {"online": ["down"]}),)
VALUES = ("ppl", "kl", "top1", *TASKS, "seconds")  # what varies with the calibration draw


def _recipe(name: str, weight: str, algorithm: str, transforms: tuple = ()) -> Recipe:
    return Recipe(name=name, rules=(Rule(pattern=".*", weight=weight, algorithm=algorithm),), transforms=transforms)


def recipes() -> list[tuple[str, str, Recipe | str]]:
    """``(bits, method, recipe)`` in run order; a ``TUNED`` method follows its base method (same recipe)."""
    out = []
    for bits, int_fmt in INT.items():
        gptq = _recipe(f"gptq-{int_fmt}", int_fmt, "gptq")
        out += [(bits, "RTN", _recipe(f"rtn-{int_fmt}", int_fmt, "rtn")),
                (bits, "GPTQ", gptq),
                (bits, "GPTQ + RHT", _recipe(f"quarot-gptq-{int_fmt}", int_fmt, "gptq", RHT)),
                (bits, "GPTVQ-style", f"gptvq-{bits}"),
                (bits, "PCDVQ", f"pcdvq-{bits}")]
        if bits == "w2":
            out += [(bits, "PCDVQ, nearest rounding", _recipe("pcdvq-nearest-w2", "pcdvq-d8-a14-b2", "rtn")),
                    (bits, "GPTQ" + TUNED, gptq), (bits, "PCDVQ" + TUNED, f"pcdvq-{bits}")]
    return out


def linear_bits(model) -> float:
    """Bits per weight of the quantized tensors: their stored arrays plus shared codebooks (once)."""
    rows = jq.size_report(model).rows
    quantized = [r for r in rows if r[3] not in ("bfloat16", "float32", "float16")]
    return 8 * sum(r[2] for r in quantized) / sum(r[1] for r in quantized)


def evaluate(model, reference, tokenizer, windows, n_items: int) -> dict:
    """Perplexity, KL to ``reference`` (the float model) and top-1 agreement with it on the same ``windows``,
    zero-shot accuracy per task and bits per parameter of the whole model."""
    agreement = distribution_agreement(model, reference, windows, batch_size=16)
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    return {"ppl": perplexity(model, windows, batch_size=16, progress=False).ppl, "kl": agreement.kl,
            "top1": agreement.top1, **{t: zs[t].accuracy for t in TASKS},
            "bits_param": jq.size_report(model).bits_per_parameter}


def simulated(model, fmt: PolarVQFormat, parts: str):
    """A copy of ``model`` with every linear (not embeddings/head) replaced by ``simulate_parts``."""
    copy = nnx.clone(model)
    for site in find_sites(copy):
        if site.spec.kind != "linear" or site.path.endswith("lm_head"):
            continue
        w = site.weight.get_value()
        site.weight.set_value(simulate_parts(w, fmt, parts).astype(w.dtype))
    return copy


def _row_name(row: dict) -> str:
    """The row id within its table: ``bits/method`` (quantized) or ``a/b/parts`` (sensitivity)."""
    return f"{row['a']}/{row['b']}/{row['parts']}" if "parts" in row else f"{row['bits']}/{row['method']}"


def _add(results: Results, table: str, row: dict) -> None:
    results.add({"table": table, "name": _row_name(row), **row})
    print(row, flush=True)


def run(args: argparse.Namespace, results: Results) -> None:
    """Float row, every recipe per calibration seed (once, on the first seed, for a recipe that does not
    calibrate), then the sensitivity rows; rows already in ``results`` are skipped."""
    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    results.set_meta(n_windows=len(windows))
    codebook = dict(results.meta.get("codebook_seconds", {}))
    for fmt in sorted({jq.formats.get_format(jq.recipes.get(f"pcdvq-{bits}").rules[0].weight) for bits in INT},
                      key=lambda f: f.name):  # data-free codebooks: built once, offline in the paper, not timed below
        t0 = time.perf_counter()
        fmt.codebooks()
        codebook.setdefault(fmt.name, time.perf_counter() - t0)  # a resumed run keeps the first build's time
    results.set_meta(codebook_seconds=codebook)
    if not results.has(table="quantized", name=f"16/{FLOAT}", seed=None):
        _add(results, "quantized", {"bits": "16", "method": FLOAT, "recipe": "-", "seed": None, "seconds": 0.0,
                                    "linear_bits": 16.0,
                                    **evaluate(loaded.model, loaded.model, tok, windows, args.items)})
    for seed in args.seeds:
        calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(seed))
        results.set_meta(n_calib=len(calib))
        tuned_rows = {(b, m) for b, m, _ in recipes() if m.endswith(TUNED)}
        built: dict[tuple[str, str], tuple[Any, float]] = {}  # this seed's base models of the TUNED rows
        for bits, method, recipe in recipes():
            if (results.has(table="quantized", name=f"{bits}/{method}", seed=seed)
                    or (seed != args.seeds[0] and not jq.needs_calibration(loaded.model, recipe))):
                continue  # done, or a recipe that does not calibrate: its first seed's row stands for all
            t0 = time.perf_counter()
            qmodel, seconds = built.pop((bits, method.removesuffix(TUNED)), None) or (
                jq.quantize(loaded.model, recipe, calib, progress=False), 0.0)
            seconds += time.perf_counter() - t0
            tuned = {}
            if method.endswith(TUNED):
                t0 = time.perf_counter()
                result = tune_continuous(qmodel, loaded.model, calib,
                                         ContinuousTuneConfig(steps=args.tune_steps, seed=seed,
                                                              warmup_steps=min(5, args.tune_steps // 10)),
                                         progress=False)
                qmodel, seconds = result.model, seconds + time.perf_counter() - t0
                tuned = {"tuned_parameters": result.n_parameters, "tune_kl_first": result.history[0],
                         "tune_kl_last": result.history[-1]}
            elif (bits, method + TUNED) in tuned_rows:
                built[(bits, method)] = (qmodel, seconds)
            name = recipe if isinstance(recipe, str) else recipe.name
            _add(results, "quantized", {"bits": bits, "method": method, "recipe": name, "seed": seed,
                                        "seconds": seconds, "linear_bits": linear_bits(qmodel), **tuned,
                                        **evaluate(qmodel, loaded.model, tok, windows, args.items)})
    for a, b in SENSITIVITY:
        fmt = PolarVQFormat(vector_dim=8, direction_bits=a, magnitude_bits=b)
        for parts in ("direction", "magnitude"):
            if not results.has(table="sensitivity", name=f"{a}/{b}/{parts}", seed=None):
                model = simulated(loaded.model, fmt, parts)
                _add(results, "sensitivity", {"a": a, "b": b, "parts": parts, "seed": None,
                                              **evaluate(model, loaded.model, tok, windows, args.items)})


KL = Column("KL (1e-3 nats)", harness.mean_std("kl", ".2f", 1e3))
TOP1 = Column("top-1", harness.mean_std("top1", ".4f"))
COLUMNS = [Column("bits", "bits"), Column("method", "method"), Column("recipe / format", "recipe"),
           Column("seeds", lambda r: len(r["seeds"])), Column("ppl", harness.mean_std("ppl", ".2f")),
           Column("Δppl", "dppl", "+.2f"), KL, TOP1, Column("next_line", harness.mean_std("next_line", ".3f")),
           Column("same_source", harness.mean_std("same_source", ".3f")), Column("bits/weight", "linear_bits", ".3f"),
           Column("bits/param", "bits_param", ".2f"), Column("time (s)", "seconds", ".1f")]
SENSITIVITY_COLUMNS = [Column("direction bits a", "a"), Column("magnitude bits b", "b"),
                       Column("quantized part", "parts"), Column("ppl", "ppl", ".2f"), Column("Δppl", "dppl", "+.2f"),
                       KL, TOP1, Column("next_line", "next_line", ".3f"), Column("same_source", "same_source", ".3f")]


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``: one row per recipe (mean ± std over the calibration seeds), the sensitivity rows, the
    verdict and the summary."""
    results = runs[0]
    args, meta = results.args, results.meta
    rows = harness.over_seeds([r for r in results.rows if r["table"] == "quantized"], by=("bits", "method"),
                              values=VALUES)
    sens = [r for r in results.rows if r["table"] == "sensitivity"]
    base_ppl = rows[0]["ppl"]
    lines = [f"# Vector quantization (GPTVQ-style, PCDVQ) vs RTN/GPTQ on {args['model']}", "",
             f"Validation perplexity over {meta['n_windows']} windows of 256 tokens, KL divergence from the float "
             "model's next-token distribution (1e-3 nats per token) and top-1 agreement with it on the same windows; "
             f"zero-shot accuracy on {args['items']} items per task (test split; chance: next_line 0.25, same_source "
             f"0.33; two binomial standard errors at this count: ±{2 * (0.25 / args['items']) ** 0.5:.3f}); "
             f"calibration {meta['n_calib']} random 256-token train windows per seed; mean ± std over the calibration "
             f"seeds {', '.join(map(str, args.get('seeds', [0])))} for the recipes that calibrate (`seeds`: runs "
             "averaged; a recipe that does not calibrate runs once). `bits/weight`: stored "
             "bits of the quantized linears (codes, scales, zero points, codebooks; PCDVQ's shared codebooks counted "
             "once per model); `bits/param`: the whole model, bf16 embeddings and head included. Times: CPU (2 "
             f"shared cores), calibration forward included, mean over the seeds. {harness.reproduce(results.command)} "
             "PCDVQ's data-free codebooks are built once before timing (seconds: "
             f"{', '.join(f'{k} {v:.1f}' for k, v in meta.get('codebook_seconds', {}).items())}).",
             "", *harness.table([{**r, "dppl": r["ppl"] - base_ppl} for r in rows], COLUMNS)]
    if sens:
        lines += ["", "## Sensitivity: quantize only the directions or only the magnitudes", "",
                  "Every linear after the random Hadamard transform and unit-RMS scaling, vectors of 8, nearest "
                  "rounding (no calibration: one run); `direction`: each vector keeps its exact norm, `magnitude`: "
                  "its exact direction.", "",
                  *harness.table([{**r, "dppl": r["ppl"] - base_ppl} for r in sens], SENSITIVITY_COLUMNS)]
    if (text := _verdict(rows, args["items"])) is not None:
        lines += ["", harness.verdict(text)]
    lines += ["", *summary(rows, sens), *tuning(rows), "", *NOTES]
    if any("kl" in r for r in rows[1:]):
        lines += ["", f"![KL and perplexity against bits per weight]({base.name}.png)"]
        _plot(rows[1:], base.with_name(base.name + ".png"))
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The older layout (config, two row lists, counts side by side) -> the harness layout."""
    config = data["config"]
    command = (f"python experiments/vq.py --model {config['model']} --windows {config['windows']} "
               f"--items {config['items']} --calib {config['calib']}")
    rows = [{"table": table, "name": _row_name(r), **r,
             "seed": 0 if table == "quantized" and r["method"] != FLOAT else None}  # one calibration draw, key 0
            for table, key in (("quantized", "rows"), ("sensitivity", "sensitivity")) for r in data[key]]
    meta = {k: data[k] for k in ("n_windows", "n_calib", "codebook_seconds") if k in data}
    return {"script": "vq", "command": command,
            "args": {**{k: v for k, v in config.items() if k != "report_only"}, "seeds": [0]},
            "key": ["table", "name", "seed"], "meta": meta, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=160, help="validation windows (default: %(default)s)")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (default: %(default)s)")
    parser.add_argument("--tune-steps", type=int, default=60,
                        help="Adam steps of the fine-tuned rows (batches of 4 calibration windows; default: %(default)s)")
    harness.add_arguments(parser, model="jq-llama-small", seeds=[0, 1, 2])
    harness.run_experiment(parser, stem=lambda a: f"vq{'-' + a.model if a.model != 'jq-llama-small' else ''}",
                           key=("table", "name", "seed"), run=run, report=report, legacy=legacy,
                           quick={"windows": 2, "items": 8, "calib": 4, "seeds": [0, 1], "tune_steps": 2})


NOTES = [
    "## Notes and deviations",
    "",
    "- PCDVQ's bits/weight include its shared direction codebook (2^a x 8 float16, counted once per model). "
    "On this model's 7.9 M quantized weights that table is a large overhead for a = 16 (the 2.25-bit setting), "
    "which the paper's 7-70 B models amortise; its index bits alone are (a + b) / k.",
    "- RTN/GPTQ use the nearest integer settings (int2 g128, int2 g64, int3 g128, asymmetric, fp16 scales and "
    "uint8 zero points), so their bits/weight differ from the VQ rows: compare along the bits/weight column.",
    "- PCDVQ at 3 bits uses k = 4 with directions from the D4 lattice (greedy farthest point), jquant's "
    "extension: k = 8 would need a 22-bit direction index.",
    "- Fine-tuning (`+ fine-tuning` rows): spec §3.6's end-to-end step only (scales and norm gains as multiplicative "
    "corrections, KL to the float model on the calibration windows; codes, zero points and codebooks frozen); not "
    "the per-layer step, and PCDVQ's Hadamard signs stay fixed (the format regenerates them from its seed). GPTQ "
    "gets the same tuning, so the comparison answers the reviewers' question whether baselines were tuned alike. "
    "The GPTVQ-style rows include the per-layer codebook update (100 Adam steps on the layer output error).",
    "- The PCDVQ rows use BlockLDLQ error feedback with Hessian-aware re-scoring of the 8 most similar "
    "directions; `PCDVQ, nearest rounding` is the same format without calibration.",
]


def _paired(ours: dict, other: dict, value: str) -> tuple[float, float | None]:
    """Mean of ``other − ours`` in ``value`` paired by calibration seed, and its standard error (None from one seed);
    ``over_seeds`` rows, where a row of one run (a recipe that does not calibrate) stands for every seed."""
    a, b = (dict(zip(r["seeds"], r[f"{value}_runs"])) for r in (ours, other))
    if len(b) == 1:
        b = dict.fromkeys(a, *b.values())
    if len(a) == 1:
        a = dict.fromkeys(b, *a.values())
    diffs = [b[s] - a[s] for s in a if s in b]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def _beyond(diff: float, se: float | None) -> bool:
    """Whether a positive paired difference exceeds twice its standard error (never from one seed)."""
    return se is not None and diff > 2 * se


def _two_se(se: float | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    """``2 SE <twice se times scale>``, or that one seed gives none."""
    return "no standard error from one seed" if se is None else f"2 SE {format(2 * scale * se, fmt)}"


def _verdict(rows: list[dict], items: int) -> str | None:
    """The paper's claim (PCDVQ ahead of the scalar and VQ baselines at 2 bits; the abstract: by at least 1.5 points
    of zero-shot accuracy) from the w2 rows (``rows``: one per recipe, means over the calibration seeds).
    Perplexity: PCDVQ's mean below every RTN, GPTQ and GPTVQ-style row of w2 and of w2.25 (which store at least its
    bits per weight) by more than twice the standard error of the paired per-seed difference. Accuracy: PCDVQ's mean
    over the tasks above the best w2 baseline's by more than two binomial standard errors of the difference (the
    items are the same on every seed). Both: reproduced; perplexity only: partly; otherwise not reproduced. KL to
    float, tested the same way as perplexity, is reported beside it. None without the rows."""
    names = ("RTN", "GPTQ", "GPTQ + RHT", "GPTVQ-style")
    ours = next((r for r in rows if r["bits"] == "w2" and r["method"] == "PCDVQ"), None)
    baselines = [r for r in rows if r["bits"] in ("w2", "w2.25") and r["method"] in names]
    if ours is None or not baselines:
        return None
    gaps = [(r, *_paired(ours, r, "ppl")) for r in baselines]
    ppl_ok = all(_beyond(gap, se) for _, gap, se in gaps)
    # the baseline that decides: the smallest margin over twice the standard error (from one seed: the smallest gap)
    close, gap, se = min(gaps, key=lambda g: g[1] - 2 * (g[2] or 0.0))

    def acc(r: dict) -> float:
        return 100 * sum(r[t] for t in TASKS) / len(TASKS)

    def pm(r: dict, value: str, scale: float = 1.0) -> str:
        return harness.mean_std(value, ".2f", scale)(r)

    top = max((r for r in baselines if r["bits"] == "w2"), key=acc)
    acc_se = 50 * sum(r[t] * (1 - r[t]) / items for r in (ours, top) for t in TASKS) ** 0.5
    acc_ok = acc(ours) - acc(top) > 2 * acc_se
    category = "reproduced" if ppl_ok and acc_ok else "partly reproduced" if ppl_ok else "not reproduced"
    kl = ""
    if all(r.get("kl") is not None for r in (ours, *baselines)):
        best = min(baselines, key=lambda r: r["kl"])
        kl_gap, kl_se = _paired(ours, best, "kl")
        kl = (f"; its KL to float, {pm(ours, 'kl', 1e3)}e-3 nats, is {'' if _beyond(kl_gap, kl_se) else 'not '}below "
              f"the lowest baseline's ({best['method']} {best['bits']}, {pm(best, 'kl', 1e3)}e-3) by more than twice "
              f"the paired standard error (baseline − PCDVQ {1e3 * kl_gap:+.2f}e-3, {_two_se(kl_se, 1e3, '.2f')}e-3)")
    seeds = f"mean ± std over {len(ours['seeds'])} calibration seeds" if len(ours["seeds"]) > 1 else "one seed"
    return (f"{category}: at 2 bits PCDVQ's perplexity {pm(ours, 'ppl')} ({ours['linear_bits']:.3f} bits/weight; "
            f"{seeds}) is {'below' if ppl_ok else 'not below'} every w2 and w2.25 baseline's by more than twice the "
            f"standard error of the paired per-seed difference (closest: {close['method']} {close['bits']} "
            f"{pm(close, 'ppl')} at {close['linear_bits']:.3f} bits/weight; baseline − PCDVQ {gap:+.3f}, "
            f"{_two_se(se)}){kl}; its mean zero-shot accuracy, "
            f"{acc(ours):.1f} % against {top['method']}'s {acc(top):.1f} %, is {'beyond' if acc_ok else 'within'} "
            f"two standard errors ({2 * acc_se:.1f} points), so the paper's 1.5-point gain "
            + ("shows" if acc_ok else "cannot be resolved" if 2 * acc_se > 1.5 else "does not show")
            + f" at {items} items per task.")


def _plot(rows: list[dict], path: Path) -> None:
    """KL to float (log scale) and perplexity against stored bits per weight, one line per method (seed means)."""
    ordered = sorted(rows, key=lambda r: r["linear_bits"])
    fig, ((ax_kl, ax_ppl),) = harness.figure(1, 2, size=(6.0, 4.5))
    kl = [{**r, "KL (nats)": r["kl"]} for r in ordered if r.get("kl")]
    harness.plot_rows(ax_kl, kl, x="linear_bits", y="KL (nats)", series="method", title="KL to float vs bits/weight",
                      yscale="log")
    harness.plot_rows(ax_ppl, ordered, x="linear_bits", y="ppl", series="method", title="perplexity vs bits/weight")
    for ax in (ax_kl, ax_ppl):
        ax.set_xlabel("bits per weight (stored)")
    harness.save_figure(fig, path)


def tuning(rows: list[dict]) -> list[str]:
    """What the end-to-end fine-tuning changes at 2 bits (paired per seed, mean ± SE; beyond 2 SE counts), and the
    two tuned methods against each other (``rows``: one per recipe, means over the seeds)."""
    at = {r["method"]: r for r in rows if r["bits"] == "w2"}
    out = []

    def change(ours: dict, other: dict, value: str, scale: float, fmt: str, unit: str = "") -> str:
        gap, se = _paired(ours, other, value)
        text = format(-scale * gap, fmt) + unit
        if se is None:
            return text + " (one seed)"
        word = "beyond" if abs(gap) > 2 * se else "within"
        return f"{text} ± {format(scale * se, fmt.lstrip('+'))}{unit} ({word} 2 SE)"

    for base in ("PCDVQ", "GPTQ"):
        ours, before = at.get(base + TUNED), at.get(base)
        if ours and before:
            out.append(f"- {base} w2 + fine-tuning ({ours['tuned_parameters']} tuned values) − {base}: ppl "
                       f"{change(ours, before, 'ppl', 1.0, '+.3f')}, KL "
                       f"{change(ours, before, 'kl', 1e3, '+.2f', 'e-3')}.")
    p, g = at.get("PCDVQ" + TUNED), at.get("GPTQ" + TUNED)
    if p and g:
        out.append(f"- Both tuned, PCDVQ − GPTQ at w2: ppl {change(p, g, 'ppl', 1.0, '+.3f')}, KL "
                   f"{change(p, g, 'kl', 1e3, '+.2f', 'e-3')} ({p['linear_bits']:.3f} vs {g['linear_bits']:.3f} "
                   "bits/weight).")
    return out


def _order(group: list[dict]) -> str:
    """``method (ppl, KL)`` of ``group`` in increasing mean perplexity."""
    def one(r: dict) -> str:
        kl = f", KL {1e3 * r['kl']:.2f}e-3" if r.get("kl") is not None else ""
        return f"{r['method']} ({r['ppl']:.2f}{kl})"
    return " < ".join(map(one, sorted(group, key=lambda r: r["ppl"])))


def summary(rows: list[dict], sens: list[dict]) -> list[str]:
    """Computed statements (no fixed numbers): the best method per width by perplexity and by KL, the spread over
    the calibration seeds, and the sensitivity gap (``rows``: one per recipe, means over the seeds)."""
    base = rows[0]["ppl"]
    out = ["## Summary (computed from the tables above)", ""]
    for bits in INT:
        group = [r for r in rows if r["bits"] == bits]
        if group:
            best = min(group, key=lambda r: r["ppl"])
            by_kl = (f", lowest KL to float {min(group, key=lambda r: r['kl'])['method']}"
                     if all(r.get("kl") is not None for r in group) else "")
            out.append(f"- {bits}: lowest mean perplexity {best['method']} ({best['ppl'] - base:+.2f} over float)"
                       f"{by_kl}; order: {_order(group)}.")
    seeded = [r for r in rows if len(r["ppl_runs"]) > 1]
    if seeded:
        wide = max(seeded, key=lambda r: r["ppl_std"])
        spread = (f"- Over {len(wide['seeds'])} calibration seeds the largest perplexity std is "
                  f"{wide['ppl_std']:.3f} ({wide['method']} {wide['bits']})")
        if all(r.get("kl") is not None for r in seeded):
            kl = max(seeded, key=lambda r: r["kl_std"] / r["kl"])
            spread += (f"; the largest relative KL std {100 * kl['kl_std'] / kl['kl']:.1f} % ({kl['method']} "
                       f"{kl['bits']})")
        out.append(spread + ".")
    for task in TASKS:
        if len({r[task] for r in rows + sens}) == 1:
            out.append(f"- {task}: the same accuracy in every row; the task does not separate these models.")
    for a, b in SENSITIVITY:
        d = next((r for r in sens if (r["a"], r["b"], r["parts"]) == (a, b, "direction")), None)
        m = next((r for r in sens if (r["a"], r["b"], r["parts"]) == (a, b, "magnitude")), None)
        if d and m:
            out.append(f"- a={a}, b={b}: directions only cost {d['ppl'] - base:+.2f} ppl, magnitudes only "
                       f"{m['ppl'] - base:+.2f} ppl ({'directions' if d['ppl'] > m['ppl'] else 'magnitudes'} are more "
                       "sensitive).")
    return out


if __name__ == "__main__":
    main()
