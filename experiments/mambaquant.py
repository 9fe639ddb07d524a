"""MambaQuant vs RTN, SmoothQuant and Hadamard rotation at W8A8 and W4A8 (conv1d float or quantized)
-> experiments/results/mambaquant.md.

    python experiments/mambaquant.py --model jq-mamba-small     # about 3 h on 2 cores shared with the test suite
    python experiments/mambaquant.py --report-only              # rebuild the .md/.png from the .json
    python experiments/mambaquant.py --quick --out /tmp/m       # smoke run: a few windows and items

Every quantized setting uses the spec's quantizers (§3.1, §3.8): per-output-channel asymmetric
RTN weights (int8 or int4) and dynamic per-tensor asymmetric int8 activations (one scale per
sequence) at every linear input except the head; embeddings and head stay float. Methods are
the built-in ``rtn-mamba-{setting}`` and ``mambaquant-{setting}`` recipes, the latter with
parts switched off for the baselines and the paper's cumulative ablation:

- SmoothQuant: S0/S2/S5 smoothing (alpha 0.5) at the in_proj, out_proj and dt_proj inputs, no rotation;
- Hadamard (QuaRot-style): random-Hadamard R1/R5 offline and the online Hadamard before out_proj;
- ablation: offline Hadamard -> +KLT (R1 = K1 H, R5 = K5 H) -> +online Hadamard -> +smooth-fused (= MambaQuant).

Metrics: validation perplexity (256-token windows), KL divergence to the float model's next-token distribution
and top-1 agreement with it on the same windows (``jquant.eval.distribution_agreement``), zero-shot accuracy on
the bundled tasks, and the per-site activation SNR of each site's own quantizer
(``InputStatistics.quantization_snr_db``, mean over layers per site kind) on held-out windows. Calibration: random
256-token train windows drawn with each of ``--seeds`` (0 1 2 by default); the seed is also the transform's seed
(its random Hadamard signs), so every ``mambaquant-*`` row runs once per seed, RTN (no calibration, no randomness)
once. The tables show mean ± std over the seeds; the verdict compares methods by their paired per-seed differences.
Rows are saved as they finish (``--resume`` keeps them); the older json layout is read too (one seed, 0).
"""

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import harness
import jquant as jq
from harness import Column, Results
from jquant.calib.capture import model_input_statistics
from jquant.data import load_split, random_windows, token_windows
from jquant.eval import distribution_agreement, perplexity, zero_shot
from jquant.models import load

# "-conv": the depthwise conv1d weights (per channel) and inputs (site a1) quantized too, with S7 wherever the method
# smooths; the plain settings keep the conv1d float (the family's keep_float). "-ssm": the SSM matmul's operands h and
# C (site a4) quantized per token too, with S4 wherever the method smooths and R4 wherever it rotates online
SETTINGS = ("w8a8", "w4a8", "w8a8-conv", "w4a8-conv", "w8a8-ssm", "w4a8-ssm")
TASKS = ("next_line", "same_source")
SITES = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
# method -> mambaquant step options (None: plain RTN recipe)
METHODS = {
    "RTN": None,
    "SmoothQuant": {"rotate": False, "online": False},
    "Hadamard (QuaRot-style)": {"klt": False, "smooth": False},
    "offline Hadamard": {"klt": False, "smooth": False, "online": False},
    "+KLT": {"smooth": False, "online": False},
    "+online Hadamard": {"smooth": False},
    "+smooth-fused (MambaQuant)": {},
}
PAPER = """Paper numbers (spec §4; W8A8 from a third-party quote of the paper's tables, W4A8 from the official
repository's logs; 5-task zero-shot average accuracy %, Vim: ImageNet top-1 %):

| Model | FP16 | RTN | SmoothQuant | QuaRot | MambaQuant W8A8 | MambaQuant W4A8 (log) |
|---|---|---|---|---|---|---|
| Mamba-1.4B | 58.6 | 53.9 | 54.2 | 56.9 | 58.3 | – |
| Mamba-2.8B | 62.2 | 58.4 | 58.7 | 59.3 | 62.1 (log: 61.8) | 58.9 |
| Vim-T | 76.1 | 37.4 | 37.7 | 59.3 | 75.6 | 72.1 |

Cumulative ablation, Vim-T† W8A8 (quoted): RTN 32.4 → offline Hadamard 33.9 → +KLT 47.7 → +online Hadamard 69.7
→ +smooth-fused 77.8 (FP ≈ 78.3).
"""
OURS = "+smooth-fused (MambaQuant)"
BASELINES = ("RTN", "SmoothQuant", "Hadamard (QuaRot-style)")
SSM_METHODS = ("RTN", "Hadamard (QuaRot-style)", OURS)  # the methods the -ssm settings run (the paper's comparison)
ABLATION = tuple(METHODS)[3:]
VALUES = ("ppl", "kl", "top1", *TASKS, "zero_shot", "seconds", *(f"snr_{k}" for k in SITES))  # vary with the seed
DEVIATIONS = """Deviations from the paper's configuration (spec §3.6): the SSM matmul operands (h and C, site a4) are
quantized only in the `-ssm` settings (per token, int8 asymmetric; RTN, the Hadamard baseline with R4 and MambaQuant
with S4 + R4; S4 by SmoothQuant's balanced rule over h and C, not the official code's C-only rule, which made the
SSM-matmul error worse on the test model); the depthwise conv1d is quantized
only in the `-conv` settings (per-channel weights over its 4 taps, per-tensor inputs, S7 with the other smoothings),
the head stays float (the paper quantizes lm_head's weights), and R2 is a plain random Hadamard (the LLM code's
K2·H variant is not used). Activation scales are per sequence of 256 tokens (the paper: per 2048-token sample)."""



def site_snr(model, tokens: np.ndarray) -> dict[str, float]:
    """Mean activation SNR (dB) per site kind over the layers, on ``tokens``."""
    stats = model_input_statistics(model, tokens, batch_size=8)
    by_kind: dict[str, list[float]] = {k: [] for k in SITES}
    for path, s in stats.items():
        kind = path.rsplit("/", 1)[-1]
        if kind in by_kind and s.energy is not None:
            by_kind[kind].append(s.quantization_snr_db)
    return {k: float(np.mean(v)) for k, v in by_kind.items() if v}


def evaluate(model, reference, tokenizer, windows, snr_tokens, n_items: int) -> dict:
    """Perplexity, KL to ``reference`` (the float model) and top-1 agreement with it on the same ``windows``,
    zero-shot accuracy per task and, for a quantized ``model``, the per-site activation SNR."""
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    out = {"ppl": perplexity(model, windows, batch_size=8, progress=False).ppl, **{t: zs[t].accuracy for t in TASKS}}
    if model is reference:
        return {**out, "kl": 0.0, "top1": 1.0}
    agreement = distribution_agreement(model, reference, windows, batch_size=8)
    return {**out, "kl": agreement.kl, "top1": agreement.top1, "snr_db": site_snr(model, snr_tokens)}


def _recipe(setting: str, options: dict | None, seed: int) -> jq.recipes.Recipe:
    """The method's recipe: plain RTN (``options`` None) or MambaQuant's steps with ``options``, seeded."""
    if options is None:
        return jq.recipes.get(f"rtn-mamba-{setting}")
    if setting.endswith("-conv"):  # S7 is one of the smoothings: on exactly where S2/S5 are
        options = {**options, "smooth_conv": options.get("smooth", True)}
    if setting.endswith("-ssm"):  # S4 with the smoothings (by the balanced rule, as the recipe), R4 with the online R2
        options = {**options, "smooth_state": options.get("smooth", True), "state_rule": "balanced",
                   "rotate_state": options.get("online", True)}
    return jq.recipes.get(f"mambaquant-{setting}", transform_options={**options, "seed": seed})


def run(args: argparse.Namespace, results: Results) -> None:
    """The FP row, then every setting x method per seed (once for a method that does not calibrate); rows already
    in ``results`` are skipped."""
    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    snr_tokens = random_windows(load_split("validation"), tok, args.snr_windows, 256, jax.random.key(1))
    results.set_meta(windows=len(windows), jax=jax.__version__)
    if not results.has(setting="w16a16", method="FP", seed=None):
        t0 = time.perf_counter()
        results.add({"setting": "w16a16", "method": "FP", "seed": None, "seconds": 0.0,
                     **evaluate(loaded.model, loaded.model, tok, windows, snr_tokens, args.items)})
        print(results.rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
    for seed in args.seeds:
        calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(seed))
        for setting in SETTINGS:
            for method, options in METHODS.items():
                if setting.endswith("-ssm") and method not in SSM_METHODS:
                    continue
                recipe = _recipe(setting, options, seed)
                if results.has(setting=setting, method=method, seed=seed) or (
                        seed != args.seeds[0] and not jq.needs_calibration(loaded.model, recipe)):
                    continue  # done, or a method that does not calibrate: its first seed's row stands for all
                t0 = time.perf_counter()
                qmodel = jq.quantize(loaded.model, recipe, calib, progress=False)
                seconds = time.perf_counter() - t0
                results.add({"setting": setting, "method": method, "seed": seed, "options": options,
                             "seconds": seconds,
                             **evaluate(qmodel, loaded.model, tok, windows, snr_tokens, args.items)})
                print(results.rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)


def _flat(row: dict) -> dict:
    """A results row with its mean zero-shot accuracy and per-site SNR as plain values (for ``over_seeds``)."""
    return {**row, "zero_shot": float(np.mean([row[t] for t in TASKS])),
            **{f"snr_{k}": v for k, v in (row.get("snr_db") or {}).items()}}


def _settings(merged: dict[tuple[str, str], dict]) -> list[str]:
    """The quantized settings the run has rows for, in ``SETTINGS`` order (older runs have no ``-conv`` rows)."""
    return [s for s in SETTINGS if any(setting == s for setting, _ in merged)]


def _merged(results: Results) -> dict[tuple[str, str], dict]:
    """One row per (setting, method): mean, std and runs over the seeds (``harness.over_seeds``)."""
    rows = harness.over_seeds([_flat(r) for r in results.rows], by=("setting", "method"), values=VALUES)
    return {(r["setting"], r["method"]): r for r in rows}


def _paired(rows: list[dict], setting: str, ours: str, base: str, value: str) -> harness.Lead | None:
    """``base - ours`` in ``value`` per seed (``harness.paired_lead``); None where either has no such value."""
    def runs(method: str) -> dict[Any, float]:
        return {r["seed"]: r[value] for r in rows
                if r["setting"] == setting and r["method"] == method and r.get(value) is not None}

    return harness.paired_lead(runs(ours), runs(base), value)


def _decide(rows: list[dict], setting: str, ours: str, base: str) -> tuple[str, harness.Lead] | None:
    """``harness.decide`` for ``ours`` against ``base`` at ``setting`` (perplexity, else KL, beyond 2 SE)."""
    return harness.decide(*(_paired(rows, setting, ours, base, v) for v in ("ppl", "kl")))


COLUMNS = [Column("setting", "setting"), Column("method", "method"),
           Column("seeds", lambda r: len(r["seeds"]) if r["seeds"] != [None] else "–"),
           Column("ppl", harness.mean_std("ppl", ".2f")), Column("KL (1e-3 nats)", harness.mean_std("kl", ".2f", 1e3)),
           Column("top-1", harness.mean_std("top1", ".4f")), Column("mean zero-shot", harness.mean_std("zero_shot", ".3f")),
           *(Column(header, f"snr_{k}", ".1f")
             for header, k in zip(("SNR in_proj", "conv1d", "x_proj", "dt_proj", "out_proj (dB)"), SITES))]


def _summary(merged: dict[tuple[str, str], dict]) -> list[str]:
    """Computed observations on the means: perplexity gap to FP per method, the lowest mean perplexity and KL, and
    which ablation steps lowered each."""
    fp = merged[("w16a16", "FP")]["ppl"]
    summary = []
    for s in _settings(merged):
        rows = {m: r for m in METHODS if (r := merged.get((s, m)))}
        if len(rows) < len(METHODS):
            continue
        summary.append({"setting": s, **{m: rows[m]["ppl"] - fp for m in METHODS},
                        "best": min(METHODS, key=lambda m, rows=rows: rows[m]["ppl"]),
                        "best_kl": min(METHODS, key=lambda m, rows=rows: rows[m]["kl"])
                        if all(r.get("kl") is not None for r in rows.values()) else None,
                        "helped": _lowered(rows, "ppl"), "helped_kl": _lowered(rows, "kl")})
    gaps = zip(("ppl − FP: RTN", "SmoothQuant", "Hadamard", "MambaQuant"), (*BASELINES, OURS))
    return harness.table(summary, [Column("setting", "setting"), *(Column(h, m, "+.2f") for h, m in gaps),
                                   Column("lowest ppl", "best"), Column("lowest KL", "best_kl"),
                                   Column("ablation steps that lowered ppl", "helped"),
                                   Column("… that lowered KL", "helped_kl")])


def _lowered(rows: dict[str, dict], value: str) -> str:
    """The ablation steps whose mean ``value`` is below the previous step's (``rows``: one per method); None where
    a step has no such value (an older run without KL)."""
    if any(rows[m].get(value) is None for m in ABLATION):
        return None
    return ", ".join(b for a, b in itertools.pairwise(ABLATION) if rows[b][value] < rows[a][value]) or "none"


def _zero_shot_noise(results: Results) -> tuple[float, float]:
    """The largest zero-shot change of any row from FP, and one binomial standard error at the run's items."""
    fp = results.get(setting="w16a16", method="FP", seed=None)
    shift = max(abs(r[t] - fp[t]) for r in results.rows for t in TASKS)
    return shift, (0.25 / results.args["items"]) ** 0.5


def _reading(results: Results, merged: dict[tuple[str, str], dict]) -> str:
    """What the tables say at this scale, every number formatted from the run: the lossy site, the ablation steps'
    paired differences, the zero-shot noise."""
    setting = next(s for s in _settings(merged) if (s, "RTN") in merged)  # w8a8 in a full run
    rtn = merged[(setting, "RTN")]
    snr = {k: rtn[f"snr_{k}"] for k in SITES if rtn.get(f"snr_{k}") is not None}
    worst = min(snr, key=snr.get)
    others = [v for k, v in snr.items() if k != worst]
    steps = "; ".join(
        f"{b}: " + ", ".join(f"{s} {_step(results.rows, s, a, b)}" for s in _settings(merged)
                             if all((s, m) in merged for m in ABLATION))
        for a, b in itertools.pairwise(ABLATION))
    shift, se = _zero_shot_noise(results)
    return (f"Reading the tables (scale matters): {results.args['model']} is a small model trained on few tokens. "
            f"Under {setting.upper()} RTN the lowest activation SNR is at the {worst} input ({snr[worst]:.0f} dB, against "
            f"{min(others):.0f}-{max(others):.0f} dB at the other sites; the paper names the out_proj input, "
            f"`y ⊙ SiLU(z)`). Each ablation step against the one before it, as the previous step's value minus this "
            f"step's (positive: the step helped), mean ± standard error of the paired per-seed difference: {steps} "
            f"(the paper's cumulative ablation is quoted below). Zero-shot accuracies differ from FP by at "
            f"most {shift:.3f}, against a standard error of about {se:.3f} at {results.args['items']} items per task.")


def _step(rows: list[dict], setting: str, before: str, after: str) -> str:
    """One ablation step's paired perplexity and KL differences (``before - after``) in ``setting``."""
    leads = [x for v in ("ppl", "kl") if (x := _paired(rows, setting, after, before, v)) is not None]
    return " / ".join(x.text() for x in leads) or "missing"


def _verdict(results: Results, merged: dict[tuple[str, str], dict]) -> str | None:
    """The paper's claim: MambaQuant ahead of RTN, SmoothQuant and QuaRot-style Hadamard rotation. A lead counts
    where the paired per-seed difference exceeds twice its standard error, on perplexity, else on KL to float
    (``_decide``). Ahead of every baseline in every setting: reproduced; of none in any: not reproduced; otherwise
    partly; undecided with one seed (no standard error). None when a row is missing."""
    fp = merged.get(("w16a16", "FP"))
    settings = _settings(merged)
    decided = {(s, b): _decide(results.rows, s, OURS, b) for s in settings for b in BASELINES if (s, b) in merged}
    if fp is None or None in decided.values():
        return None
    outcomes = [o for o, _ in decided.values()]
    n = max(lead.n for _, lead in decided.values())
    category = ("undecided" if n < 2 else "reproduced" if all(o == "ahead" for o in outcomes) else
                "not reproduced" if "ahead" not in outcomes else "partly reproduced")
    ours = " / ".join(harness.mean_std("ppl", "+.2f")({**merged[(s, OURS)], "ppl": merged[(s, OURS)]["ppl"] - fp["ppl"]})
                      for s in settings)
    versus = "; ".join(f"{b} {s}: {o} ({lead.text()})" for (s, b), (o, lead) in decided.items())
    shift, se = _zero_shot_noise(results)
    return (f"{category}: MambaQuant's perplexity over FP is {ours} at {' / '.join(settings)} ("
            + (f"mean ± std over {n} seeds" if n > 1 else "one seed") + "); against each baseline, baseline minus MambaQuant, mean ± standard error of the paired "
            f"per-seed difference, a lead counting beyond twice that error, on perplexity or else on KL to float: "
            f"{versus}" + (" (one seed: no standard error, no lead can count)" if n < 2 else "")
            + "; zero-shot accuracy " + ("separates no row" if shift < 2 * se else "moves beyond two standard errors")
            + f" (all rows within {shift:.3f} of FP, standard error {se:.3f}).")


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md`` and ``<base>.png``."""
    results = runs[0]
    args, meta = results.args, results.meta
    merged = _merged(results)
    lines = [f"# MambaQuant on {args['model']}", "",
             (f"Model {args['model']}; calibration {args['calib']} random train windows of 256 tokens drawn with each "
             f"seed {', '.join(map(str, args['seeds']))} (also the transform's seed: its random Hadamard signs); "
             f"perplexity, KL divergence from the float model's next-token distribution (1e-3 nats per token) and "
             f"top-1 agreement with it over the same {meta['windows']} validation windows; {args['items']} zero-shot "
             f"items per task (chance: next_line 0.25, same_source 0.33); SNR over {args['snr_windows']} validation "
             f"windows. Mean ± std over the seeds for the methods that calibrate (RTN: one run). JAX {meta['jax']}, "
             f"CPU. {harness.reproduce(results.command)}"), "",
             ("Quantizers (spec §3.1/3.8): per-channel asymmetric RTN weights, dynamic per-tensor asymmetric int8 "
              "activations (one scale per 256-token sequence) at every in_proj, x_proj, dt_proj and out_proj input "
              "(and, in the `-conv` settings, at every conv1d input, with per-channel conv1d weights; in the `-ssm` "
              "settings, the SSM matmul's state h and C per token, int8 asymmetric); embeddings and head float."), ""]
    lines += harness.table(list(merged.values()), COLUMNS) + ["", "Computed from the means:", ""] + _summary(merged)
    if (text := _verdict(results, merged)) is not None:
        lines += ["", harness.verdict(text)]
    lines += ["", _reading(results, merged), "", DEVIATIONS, "", PAPER, f"![perplexity and SNR]({base.name}.png)", ""]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    _plot(merged, base.with_name(base.name + ".png"))


def _plot(merged: dict[tuple[str, str], dict], path: Path) -> None:
    """Mean perplexity per setting and method against FP; W8A8 mean activation SNR per site and method."""
    fp = merged[("w16a16", "FP")]["ppl"]
    fig, ((ax_ppl, ax_snr),) = harness.figure(1, 2)
    quantized = [r for r in merged.values() if r["method"] != "FP"]
    harness.plot_rows(ax_ppl, quantized, x="setting", y="ppl", series="method", kind="bar",
                      title="validation perplexity (mean over seeds)", ylim=(fp * 0.995, None))
    ax_ppl.axhline(fp, color="k", lw=0.8, ls="--", label="FP")
    ax_ppl.legend(fontsize=7)
    snr = [{"method": r["method"], "site": k, "dB": r[f"snr_{k}"]} for r in quantized if r["setting"] == "w8a8"
           for k in SITES if r.get(f"snr_{k}") is not None]
    harness.plot_rows(ax_snr, snr, x="site", y="dB", series="method",
                      title="W8A8: activation SNR per site (mean over layers)")
    harness.save_figure(fig, path)


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The older layout (arguments, rows and versions side by side, calibration key 0) -> the harness layout."""
    run_args = {**{k: data[k] for k in ("model", "calib", "windows", "items", "snr_windows")}, "seeds": [0]}
    rows = [{**r, "seed": None if r["method"] == "FP" else 0} for r in data["rows"]]
    return {"script": "mambaquant", "command": data["command"], "args": run_args,
            "key": ["setting", "method", "seed"], "meta": {"windows": data["windows"], "jax": data["jax"]},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (KLT covariances, smoothing)")
    parser.add_argument("--windows", type=int, default=120, help="validation windows for perplexity and KL")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task")
    parser.add_argument("--snr-windows", type=int, default=16, help="validation windows for the SNR report")
    harness.add_arguments(parser, model="jq-mamba-small", seeds=[0, 1, 2])
    harness.run_experiment(
        parser, stem=lambda a: "mambaquant" if a.model == "jq-mamba-small" else f"mambaquant-{a.model}",
        key=("setting", "method", "seed"), run=run, report=report, legacy=legacy,
        quick={"calib": 4, "windows": 2, "items": 8, "snr_windows": 2})


if __name__ == "__main__":
    main()
