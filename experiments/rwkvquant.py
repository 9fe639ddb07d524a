"""RWKVQuant vs RTN, GPTQ-only and VQ-only at about 3 and 3.25 bits per weight -> experiments/results/rwkvquant.md.

    python experiments/rwkvquant.py --model jq-rwkv6-small      # 51 min on 2 cores shared with a training run
                                                                # and another experiment (the ten quantizations: 19 min)
    python experiments/rwkvquant.py --report                    # rebuild the .md/.png from the .json

Per bits setting (``RWKVQuantConfig.preset``: 3.25 = int3-g128 GPTQ or 1-D VQ with 8 codewords per
512 weights; 3 = per-channel int3 GPTQ or 8 codewords per 4096 weights) every linear of the blocks
is quantized by:

- RTN: round to nearest on the scalar format;
- GPTQ only / VQ only: RWKVQuant with every matrix forced to one branch (``vq_fraction`` 0 or 1);
- RWKVQuant: the coarse-to-fine proxy with the paper's fixed thresholds (tau_c, tau_f), and with a
  per-model percentile threshold (``--vq-fraction``).

The element-wise mix vectors (``time_maa_*``) take the same activation-weighted codebook in every
quantized setting, so the rows differ only in how the matrices are quantized. Embedding and head stay
float. Metrics: validation perplexity, zero-shot accuracy, stored bits per weight (from the arrays),
the proxy's choice per matrix kind, and how often that choice agrees with the branch of lower
layer-output error ``tr(ΔWᵀ H ΔW)`` (``H = XᵀX`` of the float model's inputs on the calibration set).
"""

import argparse
import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

import jquant as jq
from jquant.calib.capture import model_input_statistics
from jquant.data import load_split, random_windows, token_windows
from jquant.eval import perplexity, zero_shot
from jquant.formats import QArray, dequantize
from jquant.methods.rwkvquant import RWKVQuantConfig, rwkvquant, rwkvquant_recipe
from jquant.models import load
from jquant.sites import find_sites

RESULTS = Path(__file__).resolve().parent / "results"
BITS = (3.25, 3.0)
TASKS = ("next_line", "same_source")
PAPER = """Paper (spec §4; table-level values could not be read from the PDF): RWKV-6-14B at about 3 bits loses
under 1 point of average zero-shot accuracy against FP16 (abstract); 2.14× speed-up; RWKV-7 Pile 168M at 3 bits
reaches LAMBADA ppl 18.41 / accuracy 42.25 % in the repository's log."""


def _rtn(model, config: RWKVQuantConfig, calib: np.ndarray):
    """RTN on the scalar format for every matrix; the mixes as in every other setting."""
    recipe, _ = rwkvquant_recipe(model, dataclasses.replace(config, vq_fraction=0.0))
    rules = tuple(r if r.pattern.endswith(tuple(f"time_maa_{c}" for c in "xwkvrg")) else
                  dataclasses.replace(r, algorithm="rtn", options=()) for r in recipe.rules)
    return jq.quantize(model, dataclasses.replace(recipe, name="rtn", rules=rules), calib, progress=False)


def _stored_bits(qmodel, kind: str) -> float:
    """Bits per weight of the stored arrays over the quantized sites of ``kind`` ("linear" or "elementwise")."""
    sites = [s for s in find_sites(qmodel) if s.spec.kind == kind and isinstance(s.weight.get_value(), QArray)]
    total = sum(s.weight.get_value().bits_per_element * s.weight.get_value().size for s in sites)
    return total / sum(s.weight.get_value().size for s in sites)


def _output_errors(float_model, qmodel, hessians: dict) -> dict[str, float]:
    """``tr(ΔWᵀ H ΔW)`` per quantized linear site (``H`` from the float model's calibration inputs)."""
    weights = {s.path: s.weight.get_value() for s in find_sites(float_model)}
    out = {}
    for s in find_sites(qmodel):
        q = s.weight.get_value()
        if s.spec.kind == "linear" and isinstance(q, QArray) and s.path in hessians:
            delta = np.asarray(dequantize(q, np.float32), np.float64) - np.asarray(weights[s.path], np.float64)
            out[s.path] = float(np.einsum("io,ij,jo->", delta, hessians[s.path], delta))
    return out


def _kind(path: str) -> str:
    """``layers/3/att/time_maa_w2/1`` -> ``att/time_maa_w2``."""
    return re.sub(r"^layers/\d+/|/\d+$", "", path)


def evaluate(model, tokenizer, windows, n_items: int) -> dict:
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    return {"ppl": perplexity(model, windows, batch_size=8, progress=False).ppl, **{t: zs[t].accuracy for t in TASKS}}


def run(args) -> None:
    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(0))
    linear = {s.path for s in find_sites(model) if s.spec.kind == "linear" and s.path != "lm_head"}
    hessians = {p: s.hessian for p, s in model_input_statistics(model, calib, linear).items()}
    rows = [{"bits": 16, "method": "FP", "seconds": 0.0, **evaluate(model, tok, windows, args.items)}]
    print(rows[-1], flush=True)
    for bits in BITS:
        config = RWKVQuantConfig.preset(bits)
        errors, choices = {}, {}
        runs = {"RTN": None, "GPTQ only": {"vq_fraction": 0.0}, "VQ only": {"vq_fraction": 1.0},
                "RWKVQuant (fixed thresholds)": {},
                f"RWKVQuant (percentile, {args.vq_fraction:.0%} VQ)": {"vq_fraction": args.vq_fraction}}
        for method, changes in runs.items():
            t0 = time.perf_counter()
            if changes is None:
                qmodel, report = _rtn(model, config, calib), None
            else:
                qmodel, report = rwkvquant(model, calib, dataclasses.replace(config, **changes), progress=False)
            seconds = time.perf_counter() - t0
            errors[method] = _output_errors(model, qmodel, hessians)
            row = {"bits": bits, "method": method, "seconds": seconds, "linear_bits": _stored_bits(qmodel, "linear"),
                   "mix_bits": _stored_bits(qmodel, "elementwise"), "output_error": sum(errors[method].values())}
            if report is not None:
                row["vq_share"] = report.vq_fraction
                row["tau"] = [report.tau_c, report.tau_f]
                choices[method] = {s.path: s.method for s in report.sites if s.method != "mix"}
                if method.startswith("RWKVQuant (fixed"):
                    row["proxies"] = {s.path: [s.coarse, s.fine, s.method] for s in report.sites if s.method != "mix"}
            rows.append({**row, **evaluate(qmodel, tok, windows, args.items)})
            print({k: v for k, v in rows[-1].items() if k != "proxies"}, flush=True)
        sq, vq = errors["GPTQ only"], errors["VQ only"]
        better = {p: "vq" if vq[p] < sq[p] else "sq" for p in sq}
        for method, chosen in choices.items():
            if method.startswith("RWKVQuant"):
                row = next(r for r in rows if r["bits"] == bits and r["method"] == method)
                row["agreement"] = float(np.mean([chosen[p] == better[p] for p in better]))
                row["lower_error_vq_share"] = float(np.mean([b == "vq" for b in better.values()]))
    out = {"model": args.model, "calib": args.calib, "windows": len(windows), "items": args.items, "rows": rows,
           "jax": jax.__version__,
           "command": f"python experiments/rwkvquant.py --model {args.model} --calib {args.calib} --windows "
                      f"{args.windows} --items {args.items} --vq-fraction {args.vq_fraction}"}
    (RESULTS / "rwkvquant.json").write_text(json.dumps(out, indent=1) + "\n")


def _table(data: dict) -> list[str]:
    lines = ["| bits | method | ppl | next_line | same_source | mean acc | linear bpw | mix bpw | VQ share | "
             "Σ layer-output error | proxy agrees with lower error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k, f: f.format(r[k]) if k in r else "–"  # noqa: E731
    for r in data["rows"]:
        mean = (r["next_line"] + r["same_source"]) / 2
        lines.append(f"| {r['bits']} | {r['method']} | {r['ppl']:.2f} | {r['next_line']:.3f} | {r['same_source']:.3f} | "
                     f"{mean:.3f} | {fmt(r, 'linear_bits', '{:.3f}')} | {fmt(r, 'mix_bits', '{:.2f}')} | "
                     f"{fmt(r, 'vq_share', '{:.2f}')} | {fmt(r, 'output_error', '{:.4g}')} | "
                     f"{fmt(r, 'agreement', '{:.2f}')} |")
    return lines


def _choices(data: dict) -> list[str]:
    """The fixed-threshold proxy's choice per matrix kind (how many blocks chose VQ), at each bits setting."""
    lines = ["| bits | matrix | VQ chosen in blocks | median coarse proxy P_c | median fine proxy P_f |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        if "proxies" not in r:
            continue
        by_kind: dict[str, list] = {}
        for path, (coarse, fine, method) in r["proxies"].items():
            by_kind.setdefault(_kind(path), []).append((coarse, fine, method))
        for kind, vals in sorted(by_kind.items()):
            counts = Counter(m for _, _, m in vals)
            lines.append(f"| {r['bits']} | {kind} | {counts['vq']}/{len(vals)} | {np.median([c for c, _, _ in vals]):.3f} | "
                         f"{np.median([f for _, f, _ in vals]):.3g} |")
    return lines


def _reading(data: dict) -> str:
    """What the table says, with its numbers taken from the run."""
    rows = {(r["bits"], r["method"]): r for r in data["rows"][1:]}
    fp = data["rows"][0]["ppl"]
    worst = max(r["ppl"] for r in rows.values()) - fp
    fixed = [r for (b, m), r in rows.items() if m.startswith("RWKVQuant (fixed")]
    gq, vq = rows[(3.0, "GPTQ only")], rows[(3.0, "VQ only")]
    return (f"Reading: at this scale every method stays within {worst:.2f} perplexity of FP, and the accuracy "
            f"differences (at most a point or so) are within the noise of {data['items']} items per task (standard "
            f"error about 0.034), so the paper's claim, under 1 point lost at about 3 bits, holds here for RWKVQuant "
            f"and for the baselines alike. With the paper's fixed thresholds (tau_c = 1.54, tau_f = 30) every matrix "
            f"of jq-rwkv6-small has P_c above tau_c, so the proxy sends all of them to VQ (VQ share "
            f"{fixed[0]['vq_share']:.2f}): the RWKVQuant row equals VQ only. VQ gives the lower summed layer-output "
            f"error (3 bits: {vq['output_error']:.3g} against GPTQ's {gq['output_error']:.3g}) but not a lower "
            f"perplexity ({vq['ppl']:.2f} against {gq['ppl']:.2f}). Per matrix the fixed-threshold choice agrees "
            f"with the branch of lower output error {fixed[0]['agreement']:.0%} of the time; the percentile rule "
            f"(half the matrices to VQ) agrees {rows[(3.0, 'RWKVQuant (percentile, 50% VQ)')]['agreement']:.0%}, "
            "so on this model the proxy is a weak predictor of which branch wins. The paper's gains come from "
            "14B-parameter models whose weights have far heavier outliers than a 7.9 M-parameter model trained on "
            "2 M tokens.")


def report() -> None:
    data = json.loads((RESULTS / "rwkvquant.json").read_text())
    fp = data["rows"][0]
    fp_acc = (fp["next_line"] + fp["same_source"]) / 2
    lines = ["# RWKVQuant on jq-rwkv6-small", "",
             f"Model {data['model']}; calibration {data['calib']} random train windows of 256 tokens; perplexity over "
             f"{data['windows']} validation windows; {data['items']} zero-shot items per task (chance: next_line 0.25, "
             f"same_source 0.33). JAX {data['jax']}, CPU. Reproduce: `{data['command']}`.", "",
             "Bits per weight are read from the stored arrays (codes, float16 scales/zero points, codebooks) over the "
             "block matrices; the mix vectors' bits are listed apart.", ""]
    lines += _table(data)
    lines += ["", "Computed: accuracy lost against FP (mean of the two tasks, points):", ""]
    for r in data["rows"][1:]:
        lines.append(f"- {r['bits']} bits, {r['method']}: {100 * (fp_acc - (r['next_line'] + r['same_source']) / 2):+.1f}")
    lines += ["", "The proxy's choices (fixed thresholds):", ""] + _choices(data) + ["", _reading(data), "", PAPER, "",
                                                                                   "![perplexity](rwkvquant.png)", ""]
    (RESULTS / "rwkvquant.md").write_text("\n".join(lines) + "\n")
    _plot(data)


def _plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = data["rows"][0]["ppl"]
    methods = list(dict.fromkeys(r["method"] for r in data["rows"][1:]))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        ppl = [next(r["ppl"] for r in data["rows"] if r["method"] == method and r["bits"] == b) for b in BITS]
        ax.bar([j + i * width for j in range(len(BITS))], ppl, width, label=method)
    ax.axhline(fp, color="k", lw=0.8, ls="--", label="FP")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BITS))], [f"{b} bits" for b in BITS])
    ax.set(title=f"{data['model']}: validation perplexity", ylabel="ppl", ylim=(fp * 0.98, None))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "rwkvquant.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jq-rwkv6-small")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (GPTQ/GPTVQ Hessians, mix importance)")
    parser.add_argument("--windows", type=int, default=120, help="validation windows for perplexity")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task")
    parser.add_argument("--vq-fraction", type=float, default=0.5, help="share of matrices given VQ by the percentile rule")
    parser.add_argument("--report", action="store_true", help="only rebuild rwkvquant.md/.png from the json")
    args = parser.parse_args()
    if not args.report:
        run(args)
    report()


if __name__ == "__main__":
    main()
