"""OSTQuant vs QuaRot vs SmoothQuant vs GPTQ/RTN at W4A16, W4A8KV8, W4A4KV4 -> experiments/results/ostquant.md.

    python experiments/ostquant.py --model jq-llama-tiny                 # ~15 min on 2 cores
    python experiments/ostquant.py --model jq-llama-small --steps 60     # ~45 min on 2 cores
    python experiments/ostquant.py --report-only                          # rebuild the .md/.png from the .json files
    python experiments/ostquant.py --quick --out /tmp/o                   # smoke run: a few steps and windows

Per model and setting: the built-in recipes ``{rtn,gptq,smoothquant,quarot,ostquant}-{setting}``
(int4 per-channel symmetric weights with MSE clip search; per-token asymmetric activations;
per-token-and-head asymmetric KV; embeddings and head in float). Metrics: validation
perplexity (256-token windows), zero-shot accuracy on the bundled tasks, mean QSUR^(1/d) of
the activations entering the quantized linears, and wall time (OSTQuant's CPU training
time separately). Calibration: random 256-token train windows (key 0). Writes
``ostquant-<model>.json`` per model, then ``ostquant.md`` and ``ostquant.png`` (OSTQuant
loss curves and perplexity per method) from every json present (the older json layout is read too).
"""

import argparse
import time
from pathlib import Path
from typing import Any

import jax

import harness
import jquant as jq
from harness import Column, Results
from jquant.data import load_split, random_windows, token_windows
from jquant.eval import perplexity, zero_shot
from jquant.models import load
from jquant.transforms import qsur_report

SETTINGS = ("w4a16", "w4a8kv8", "w4a4kv4")
METHODS = ("rtn", "gptq", "smoothquant", "quarot", "ostquant")
TASKS = ("next_line", "same_source")
MODELS = ("jq-llama-small", "jq-llama-tiny")
PAPER = """Paper (spec §4, Table 2; 9-task zero-shot average ↑ / WikiText2 PPL ↓):

| W-A-KV | Method | LLaMA-3-8B | LLaMA-2-7B | LLaMA-2-13B |
|---|---|---|---|---|
| 16-16-16 | FP16 | 68.09 / 6.14 | 65.21 / 5.47 | 67.61 / 4.88 |
| 4-16-16 | RTN | 63.70 / 8.13 | 61.27 / 7.02 | 60.24 / 6.39 |
| 4-16-16 | QuaRot | 67.27 / 6.53 | 64.30 / 5.62 | 66.95 / 5.00 |
| 4-16-16 | SpinQuant | 66.54 / 6.49 | 63.59 / 5.58 | 67.14 / 5.00 |
| 4-16-16 | OSTQuant | 67.80 / 6.53 | 64.37 / 5.64 | 67.31 / 4.94 |
| 4-4-16 | QuaRot | 61.69 / 8.02 | 61.87 / 6.05 | 65.13 / 5.35 |
| 4-4-16 | OSTQuant | 65.14 / 7.24 | 63.90 / 5.60 | 66.24 / 5.14 |
| 4-4-4 | RTN | 33.18 / 7e2 | 32.67 / nan | 30.93 / 7e3 |
| 4-4-4 | QuaRot | 61.38 / 8.18 | 61.48 / 6.11 | 65.16 / 5.39 |
| 4-4-4 | SpinQuant | 64.10 / 7.35 | 62.01 / 5.96 | 64.13 / 5.74 |
| 4-4-4 | OSTQuant | 65.37 / 7.29 | 63.18 / 5.91 | 65.41 / 5.25 |
"""


PAPER_TOKENS = 150 * 8 * 2048  # the paper's OSTQuant training: 150 steps of 8 x 2048 tokens
COLUMNS = [Column("setting", "setting"), Column("method", "method"), Column("ppl", "ppl", ".2f"),
           Column("next_line", "next_line", ".3f"), Column("same_source", "same_source", ".3f"),
           Column("mean QSUR", "qsur", ".4f"), Column("time (s)", "seconds", ".1f"),
           Column("of which OSTQuant training (s)", "train_seconds", ".1f")]


def evaluate(model, tokenizer, windows, qsur_tokens, n_items: int) -> dict:
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    return {"ppl": perplexity(model, windows, batch_size=16, progress=False).ppl,
            **{t: zs[t].accuracy for t in TASKS}, "qsur": qsur_report(model, qsur_tokens).mean()}


def run(args: argparse.Namespace, results: Results) -> None:
    """The float row, then every setting x method; rows already in ``results`` are skipped."""
    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(0))
    qsur_tokens = calib[: args.qsur_windows]
    results.set_meta(windows=len(windows), calib=len(calib))
    if not results.has(setting="w16a16", method="float"):
        results.add({"setting": "w16a16", "method": "float", "seconds": 0.0, "train_seconds": 0.0,
                     **evaluate(loaded.model, tok, windows, qsur_tokens, args.items)})
        print(results.rows[-1], flush=True)
    for setting in SETTINGS:
        for method in METHODS:
            if results.has(setting=setting, method=method):
                continue
            options = {"steps": args.steps, "batch_size": args.batch} if method == "ostquant" else None
            recipe = jq.recipes.get(f"{method}-{setting}", transform_options=options)
            t0 = time.perf_counter()
            qmodel = jq.quantize(loaded.model, recipe, calib, progress=False)
            seconds = time.perf_counter() - t0
            train = sum(log.seconds for log in qmodel.quantization.transforms if log.kind == "ostquant")
            curves = [list(log.losses) for log in qmodel.quantization.transforms if log.losses]
            if curves:
                results.set_meta(losses={**results.meta.get("losses", {}), setting: curves[-1]})
            results.add({"setting": setting, "method": method, "seconds": seconds, "train_seconds": train,
                         **evaluate(qmodel, tok, windows, qsur_tokens, args.items)})
            print(results.rows[-1], flush=True)


def _summary(results: Results) -> list[str]:
    """Computed observations per setting: best method, OSTQuant vs QuaRot, QSUR ordering."""
    fp = results.get(setting="w16a16", method="float")
    summary = []
    for s in SETTINGS:
        rows = {m: results.get(setting=s, method=m) for m in METHODS}
        if None in rows.values():
            continue
        best = min(METHODS, key=lambda m: rows[m]["ppl"])
        q, o, r = rows["quarot"], rows["ostquant"], rows["rtn"]
        summary.append({"setting": s, "best": f"{rows[best]['ppl']:.2f} ({best})", "o_q": o["ppl"] - q["ppl"],
                      "o_r": o["ppl"] - r["ppl"], "order": "yes" if fp["qsur"] < q["qsur"] < o["qsur"] else "no"})
    return harness.table(summary, [Column("setting", "setting"), Column("best ppl (method)", "best"),
                                   Column("OSTQuant − QuaRot ppl", "o_q", "+.2f"),
                                   Column("OSTQuant − RTN ppl", "o_r", "+.2f"),
                                   Column("QSUR float < QuaRot < OSTQuant", "order")])


def _reading(runs: list[Results]) -> str:
    """The reading of the tables, its numbers formatted from the runs."""
    degradation = []
    for results in runs:
        fp, rtn = results.get(setting="w16a16", method="float"), results.get(setting="w4a4kv4", method="rtn")
        if fp and rtn:
            degradation.append(f"{100 * (rtn['ppl'] / fp['ppl'] - 1):.1f} % on {results.args['model']}")
    training = [f"{r.args['steps']} steps of {r.args['batch']} x 256 tokens on {r.args['model']} "
                f"(1/{PAPER_TOKENS / (r.args['steps'] * r.args['batch'] * 256):.0f} of the paper's 150 x 8 x 2048)"
                for r in runs]
    return (f"Reading the tables (scale matters): the bundled models are far smaller than LLaMA and their activations "
            f"have far milder outliers, so RTN at W4A4KV4 degrades perplexity by {', '.join(degradation) or '–'} "
            f"instead of collapsing. OSTQuant here trains for {' and '.join(training)} on "
            "CPU, and its KL-Top curves are in the plot: where they are nearly flat, what OSTQuant adds over QuaRot "
            "comes from its initialisation (WOMI for the activation-quantized settings) and its scalings, not from "
            "a long descent. Compare the computed \"OSTQuant − QuaRot\" column with the paper's ordering below "
            "(OSTQuant ahead of QuaRot at W4A4KV4).\n")


def _verdict(runs: list[Results]) -> str | None:
    """The paper's claim (OSTQuant ahead of QuaRot at W4A4KV4) on perplexity, per model; the noise level is the
    largest change of one method's perplexity between its W4A16 and W4A8KV8 rows (8-bit activations and KV are
    nearly free here, so the change is mostly the run's own variation; there are no seeds). Ahead beyond that on
    every model: reproduced; ahead on every model but within it somewhere: partly; behind on any model: not
    reproduced. None when a model lacks its W4A4KV4 OSTQuant, QuaRot or RTN row."""
    pairs, noise = [], 0.0
    for results in runs:
        rows = {(r["setting"], r["method"]): r for r in results.rows}
        if not all(("w4a4kv4", m) in rows for m in ("ostquant", "quarot", "rtn")):
            return None
        pairs.append((results.args["model"], rows[("w4a4kv4", "ostquant")], rows[("w4a4kv4", "quarot")],
                      rows[("w4a4kv4", "rtn")]))
        noise = max([noise, *(abs(rows[("w4a8kv8", m)]["ppl"] - rows[("w4a16", m)]["ppl"]) for m in METHODS
                              if ("w4a8kv8", m) in rows and ("w4a16", m) in rows)])
    if not pairs:
        return None
    lead = [q["ppl"] - o["ppl"] for _, o, q, _ in pairs]
    category = ("reproduced" if all(d > noise for d in lead) else "partly reproduced" if all(d > 0 for d in lead)
                else "not reproduced")
    qsur = sum(o["qsur"] > q["qsur"] for _, o, q, _ in pairs)
    return (f"{category}: at W4A4KV4 OSTQuant − QuaRot perplexity is "
            + ", ".join(f"{o['ppl'] - q['ppl']:+.2f} on {m}" for m, o, q, _ in pairs)
            + f" (noise level {noise:.2f}, the largest W4A16 → W4A8KV8 change of one method; the paper: 7.29 vs 8.18 "
            "on LLaMA-3-8B); OSTQuant − RTN there is "
            + " / ".join(f"{o['ppl'] - r['ppl']:+.2f}" for _, o, _, r in pairs)
            + f", and OSTQuant's QSUR is above QuaRot's on {qsur} of {len(pairs)} models.")


def report(runs: list[Results], base: Path) -> None:
    """Write ``ostquant.md`` and ``ostquant.png`` (``-quick`` names for a quick run) beside ``base``."""
    name = "ostquant-quick" if base.name.endswith("-quick") else "ostquant"
    lines = ["# OSTQuant and the rotation baselines on the bundled reference models", "",
             "Int4 per-channel symmetric weights (MSE clip search) with RTN, GPTQ, SmoothQuant (alpha 0.5, RTN), "
             "QuaRot (random-Hadamard residual and value rotations, online Hadamards, GPTQ) and OSTQuant "
             "(learned residual/value rotations and scalings, KL-Top, Riemannian Adam, then GPTQ); activations "
             "per-token asymmetric, KV per token and head asymmetric; embeddings and head float. Zero-shot chance: "
             "next_line 0.25, same_source 0.33. QSUR^(1/d) is the mean over layers of the four activation sites "
             "(q/k/v, up/gate, o_proj, down_proj inputs) on calibration windows.", ""]
    for results in runs:
        args, meta = results.args, results.meta
        provenance = [f"Note: {meta['note']}", ""] if meta.get("note") else []
        lines += [f"## {args['model']}", "", *provenance,
                  f"OSTQuant: {args['steps']} steps, batch {args['batch']} x 256 tokens, from {meta['calib']} "
                  f"calibration windows; perplexity over {meta['windows']} validation windows, {args['items']} "
                  f"zero-shot items per task. {harness.reproduce(results.command)}", ""]
        lines += harness.table(results.rows, COLUMNS) + ["", "Computed from the table:", ""] + _summary(results) + [""]
    if (text := _verdict(runs)) is not None:
        lines += [harness.verdict(text), ""]
    lines += [_reading(runs), PAPER, f"![OSTQuant loss curves and perplexity]({name}.png)", ""]
    harness.write_text_atomic(base.parent / f"{name}.md", "\n".join(lines) + "\n")
    _plot(runs, base.parent / f"{name}.png")


def _plot(runs: list[Results], path: Path) -> None:
    """Per model: the OSTQuant loss curves, and perplexity per setting and method against float."""
    fig, axes = harness.figure(len(runs), 2, size=(5, 3.4))
    for (ax_loss, ax_ppl), results in zip(axes, runs):
        model = results.args["model"]
        curves = [{"setting": s, "step": i + 1, "loss": v}
                  for s, curve in results.meta.get("losses", {}).items() for i, v in enumerate(curve)]
        harness.plot_rows(ax_loss, curves, x="step", y="loss", series="setting", line="-",
                          title=f"{model}: OSTQuant KL-Top", yscale="log")
        fp = results.get(setting="w16a16", method="float")["ppl"]
        harness.plot_rows(ax_ppl, [r for r in results.rows if r["method"] != "float"], x="setting", y="ppl",
                          series="method", kind="bar", title=f"{model}: perplexity", ylim=(fp * 0.98, None))
        ax_ppl.axhline(fp, color="k", lw=0.8, ls="--", label="float")
        ax_ppl.legend(fontsize=7)
    harness.save_figure(fig, path)


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The older layout (arguments, rows and losses side by side) -> the harness layout."""
    run_args = {"model": data["model"], "steps": data["steps"], "batch": data["batch"], "calib": data["calib"],
                "windows": data["windows"], "items": data["items"]}
    meta = {"windows": data["windows"], "calib": data["calib"], "losses": data["losses"],
            **({"note": data["note"]} if data.get("note") else {})}
    return {"script": "ostquant", "command": data["command"], "args": run_args, "key": ["setting", "method"],
            "meta": meta, "rows": data["rows"]}


def _inputs(args: argparse.Namespace, path: Path) -> list[Path]:
    """Every model's json present beside ``path`` (the report covers all of them)."""
    suffix = "-quick" if path.stem.endswith("-quick") else ""
    return [p for m in MODELS if (p := path.parent / f"ostquant-{m}{suffix}.json").is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="OSTQuant steps (paper: 150)")
    parser.add_argument("--batch", type=int, default=4, help="OSTQuant batch of 256-token windows (paper: 8 x 2048)")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (GPTQ, SmoothQuant, OSTQuant)")
    parser.add_argument("--windows", type=int, default=80, help="validation windows for perplexity")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task")
    parser.add_argument("--qsur-windows", type=int, default=16, help="calibration windows for the QSUR report")
    harness.add_arguments(parser, model="jq-llama-tiny")
    harness.run_experiment(parser, stem=lambda a: f"ostquant-{a.model}", key=("setting", "method"), run=run,
                           report=report, legacy=legacy, report_inputs=_inputs,
                           quick={"steps": 2, "batch": 1, "calib": 4, "windows": 2, "items": 8, "qsur_windows": 2})


if __name__ == "__main__":
    main()
