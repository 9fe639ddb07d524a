"""OSTQuant vs QuaRot vs SmoothQuant vs GPTQ/RTN at W4A16, W4A8KV8, W4A4KV4 -> experiments/results/ostquant.md.

    python experiments/ostquant.py --model jq-llama-tiny                 # ~15 min on 2 cores
    python experiments/ostquant.py --model jq-llama-small --steps 60     # ~45 min on 2 cores
    python experiments/ostquant.py --report                               # rebuild the .md/.png from the .json files

Per model and setting: the built-in recipes ``{rtn,gptq,smoothquant,quarot,ostquant}-{setting}``
(int4 per-channel symmetric weights with MSE clip search; per-token asymmetric activations;
per-token-and-head asymmetric KV; embeddings and head in float). Metrics: validation
perplexity (256-token windows), zero-shot accuracy on the bundled tasks, mean QSUR^(1/d) of
the activations entering the quantized linears, and wall time (OSTQuant's CPU training
time separately). Calibration: random 256-token train windows (key 0). Writes
``ostquant-<model>.json`` per model, then ``ostquant.md`` and ``ostquant.png`` (OSTQuant
loss curves and perplexity per method) from every json present.
"""

import argparse
import json
import time
from pathlib import Path

import jax

import jquant as jq
from jquant.data import load_split, random_windows, token_windows
from jquant.eval import perplexity, zero_shot
from jquant.models import load
from jquant.transforms import qsur_report

RESULTS = Path(__file__).resolve().parent / "results"
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


READING = """Reading the tables (scale matters): the bundled models are 3-10 M-parameter models trained on
2.8 M tokens, and their activations have far milder outliers than LLaMA's, so RTN at W4A4KV4 degrades
perplexity by a few percent instead of collapsing. OSTQuant here trains for 60-100 steps on batches of
4 x 256 tokens, about 1/50 of the paper's 150 x 8 x 2048 tokens, on 2 CPU cores, and its KL-Top curves
(plot) are nearly flat at the code's learning rates: most of what OSTQuant adds over QuaRot here comes from
its initialisation (WOMI for the activation-quantized settings) and its scalings, not from a long descent.
Perplexity differences below ~0.1 are within the spread of the calibration draw. Compare the computed
"OSTQuant − QuaRot" column with the paper's ordering below (OSTQuant ahead of QuaRot at W4A4KV4).
"""


def evaluate(model, tokenizer, windows, qsur_tokens, n_items: int) -> dict:
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    return {"ppl": perplexity(model, windows, batch_size=16, progress=False).ppl,
            **{t: zs[t].accuracy for t in TASKS}, "qsur": qsur_report(model, qsur_tokens).mean()}


def run(args) -> None:
    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(0))
    qsur_tokens = calib[: args.qsur_windows]
    rows = [{"setting": "w16a16", "method": "float", "seconds": 0.0, "train_seconds": 0.0,
             **evaluate(loaded.model, tok, windows, qsur_tokens, args.items)}]
    print(rows[-1], flush=True)
    losses = {}
    for setting in SETTINGS:
        for method in METHODS:
            name = f"{method}-{setting}"
            options = {"steps": args.steps, "batch_size": args.batch} if method == "ostquant" else None
            recipe = jq.recipes.get(name, transform_options=options)
            t0 = time.perf_counter()
            qmodel = jq.quantize(loaded.model, recipe, calib, progress=False)
            seconds = time.perf_counter() - t0
            train = sum(log.seconds for log in qmodel.quantization.transforms if log.kind == "ostquant")
            for log in qmodel.quantization.transforms:
                if log.losses:
                    losses[setting] = list(log.losses)
            rows.append({"setting": setting, "method": method, "seconds": seconds, "train_seconds": train,
                         **evaluate(qmodel, tok, windows, qsur_tokens, args.items)})
            print(rows[-1], flush=True)
    out = {"model": args.model, "steps": args.steps, "batch": args.batch, "calib": args.calib, "windows": len(windows),
           "items": args.items, "rows": rows, "losses": losses,
           "command": f"python experiments/ostquant.py --model {args.model} --steps {args.steps} --batch {args.batch} "
                      f"--calib {args.calib} --windows {args.windows} --items {args.items}"}
    (RESULTS / f"ostquant-{args.model}.json").write_text(json.dumps(out, indent=1) + "\n")


def _table(data: dict) -> list[str]:
    lines = ["| setting | method | ppl | next_line | same_source | mean QSUR | time (s) | of which OSTQuant training (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['setting']} | {r['method']} | {r['ppl']:.2f} | {r['next_line']:.3f} | {r['same_source']:.3f} "
                     f"| {r['qsur']:.4f} | {r['seconds']:.1f} | {r['train_seconds']:.1f} |")
    return lines


def _summary(data: dict) -> list[str]:
    """Computed observations per setting: best method, OSTQuant vs QuaRot, QSUR ordering, training cost."""
    rows = {(r["setting"], r["method"]): r for r in data["rows"]}
    fp = rows[("w16a16", "float")]
    lines = ["| setting | best ppl (method) | OSTQuant − QuaRot ppl | OSTQuant − RTN ppl | QSUR float < QuaRot < OSTQuant |",
             "|---|---|---|---|---|"]
    for s in SETTINGS:
        best = min(METHODS, key=lambda m: rows[(s, m)]["ppl"])
        q, o, r = rows[(s, "quarot")], rows[(s, "ostquant")], rows[(s, "rtn")]
        order = "yes" if fp["qsur"] < q["qsur"] < o["qsur"] else "no"
        lines.append(f"| {s} | {rows[(s, best)]['ppl']:.2f} ({best}) | {o['ppl'] - q['ppl']:+.2f} | "
                     f"{o['ppl'] - r['ppl']:+.2f} | {order} |")
    return lines


def report() -> None:
    runs = [json.loads((RESULTS / f"ostquant-{m}.json").read_text()) for m in MODELS
            if (RESULTS / f"ostquant-{m}.json").is_file()]
    lines = ["# OSTQuant and the rotation baselines on the bundled reference models", "",
             "Int4 per-channel symmetric weights (MSE clip search) with RTN, GPTQ, SmoothQuant (alpha 0.5, RTN), "
             "QuaRot (random-Hadamard residual and value rotations, online Hadamards, GPTQ) and OSTQuant "
             "(learned residual/value rotations and scalings, KL-Top, Riemannian Adam, then GPTQ); activations "
             "per-token asymmetric, KV per token and head asymmetric; embeddings and head float. Zero-shot chance: "
             "next_line 0.25, same_source 0.33. QSUR^(1/d) is the mean over layers of the four activation sites "
             "(q/k/v, up/gate, o_proj, down_proj inputs) on calibration windows.", ""]
    for data in runs:
        provenance = [f"Note: {data['note']}", ""] if data.get("note") else []
        lines += [f"## {data['model']}", "", *provenance,
                  f"OSTQuant: {data['steps']} steps, batch {data['batch']} x 256 tokens, from {data['calib']} "
                  f"calibration windows; perplexity over {data['windows']} validation windows, {data['items']} "
                  f"zero-shot items per task. Reproduce: `{data['command']}`.", ""]
        lines += _table(data) + ["", "Computed from the table:", ""] + _summary(data) + [""]
    lines += [READING, PAPER, "![OSTQuant loss curves and perplexity](ostquant.png)", ""]
    (RESULTS / "ostquant.md").write_text("\n".join(lines) + "\n")
    _plot(runs)


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.4 * len(runs)), squeeze=False)
    for (ax_loss, ax_ppl), data in zip(axes, runs):
        for setting, curve in data["losses"].items():
            ax_loss.plot(range(1, len(curve) + 1), curve, label=setting)
        ax_loss.set(title=f"{data['model']}: OSTQuant KL-Top", xlabel="step", ylabel="loss", yscale="log")
        ax_loss.legend()
        fp = next(r["ppl"] for r in data["rows"] if r["method"] == "float")
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            ppl = [next(r["ppl"] for r in data["rows"] if r["method"] == method and r["setting"] == s) for s in SETTINGS]
            ax_ppl.bar([j + i * width for j in range(len(SETTINGS))], ppl, width, label=method)
        ax_ppl.axhline(fp, color="k", lw=0.8, ls="--", label="float")
        ax_ppl.set_xticks([j + 0.4 - width / 2 for j in range(len(SETTINGS))], SETTINGS)
        ax_ppl.set(title=f"{data['model']}: perplexity", ylabel="ppl", ylim=(fp * 0.98, None))
        ax_ppl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "ostquant.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jq-llama-tiny", choices=MODELS)
    parser.add_argument("--steps", type=int, default=100, help="OSTQuant steps (paper: 150)")
    parser.add_argument("--batch", type=int, default=4, help="OSTQuant batch of 256-token windows (paper: 8 x 2048)")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (GPTQ, SmoothQuant, OSTQuant)")
    parser.add_argument("--windows", type=int, default=80, help="validation windows for perplexity")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task")
    parser.add_argument("--qsur-windows", type=int, default=16, help="calibration windows for the QSUR report")
    parser.add_argument("--report", action="store_true", help="only rebuild ostquant.md/.png from the json files")
    args = parser.parse_args()
    if not args.report:
        run(args)
    report()


if __name__ == "__main__":
    main()
