"""GSQ-Tuning: integer LoRA fine-tuning against 16-bit LoRA and QLoRA -> experiments/results/gsq_tuning.md (+ .json, .png).

    python experiments/gsq_tuning.py                          # jq-llama-small, every setting
    python experiments/gsq_tuning.py --settings gse8 gse6 --steps 100
    python experiments/gsq_tuning.py --resume                 # run only the settings not yet in the JSON
    python experiments/gsq_tuning.py --resume --settings fp8  # add the FP8 baseline to the existing JSON
    python experiments/gsq_tuning.py --report-only            # rewrite the table from the JSON
    python experiments/gsq_tuning.py --quick --out /tmp/g     # smoke run: two settings, a few steps

Task (``jquant.finetune.task``): name the source of a short excerpt (" Shakespeare",
" Milton", " the Bible"); the reference model never saw these labels, so it starts near
chance. Adapters on all seven linears of every block (rank 64, alpha 16 unless a setting
says otherwise), AdamW on the FP32 masters, loss on the answer tokens. Non-GEMM operations
(attention products, norms, SiLU, the head and the loss) run in bfloat16 in every setting
("GEMM-integer", spec §7.1).

Settings: ``bf16`` (bf16 base, bf16 GEMMs: 16-bit LoRA), ``qlora`` (NF4 base, bf16 GEMMs),
``gse{8,6,5,4}`` (NF4 base, every forward and backward GEMM of the adapted linears in
GSE-INT with groups of 32, activations kept for the backward pass in GSE), ``int8-tensor``
(the same with per-tensor int8 instead of shared exponents: the spec's ablation), ``fp8``
(the spec's FP8 baseline, ``jquant.finetune.FP8Arithmetic``: NF4 base, every GEMM operand
in FP8 with one scale per tensor, E4M3 for activations and weights, E5M2 for the gradients
dy and dH of the backward GEMMs, activations kept in E4M3 codes) and ``gse{5,4}-r128``
(more rank for fewer bits: the Pareto question). Each setting trains from
the same adapter initialisation on the same batches. Columns: training loss (mean of the
last 20 steps), held-out answer loss and its perplexity, accuracy on test-split items,
validation-text perplexity (does the model keep its language modelling?) and the measured
memory of one training step (``jquant.finetune.memory``). Each setting's row is saved when it finishes;
``--settings`` only chooses which run, so ``--resume`` adds settings to an existing JSON. The older json
layout (``config``/``before``/``runs``) is read too; ``--resume`` rewrites it in the harness layout first
(the same rows and meta) so that rows can be added to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import jquant as jq
from harness import Results
from jquant.eval import split_perplexity
from jquant.eval.zeroshot import evaluate_multiple_choice
from jquant.finetune import (FinetuneConfig, FP8Arithmetic, LoRAArithmetic, LoRAConfig, LoRAParam, add_lora,
                             evaluate_loss, finetune)
from jquant.finetune.memory import training_memory
from jquant.finetune.task import source_items, supervised_rows
from jquant.finetune.train import batch_loss
from jquant.formats import FP8Format, GSEFormat, IntFormat
from jquant.models import load
from jquant.recipes import Recipe, Rule

NF4 = Recipe(name="nf4", description="QLoRA base: NF4, blocks of 64, FP8 double-quantized block constants",
             rules=(Rule(pattern=".*", weight="nf4"),))


def _gse(bits: int) -> LoRAArithmetic:
    return LoRAArithmetic(operands=GSEFormat(bits=bits), saved="quantized")


# name -> (base, arithmetic, rank, description)
SETTINGS: dict[str, tuple[str, LoRAArithmetic, int, str]] = {
    "bf16": ("bf16", LoRAArithmetic(), 64, "16-bit LoRA: bf16 base, bf16 GEMMs"),
    "qlora": ("nf4", LoRAArithmetic(), 64, "QLoRA: NF4 base, bf16 GEMMs, float adapters"),
    "gse8": ("nf4", _gse(8), 64, "GSQ-Tuning GSE-INT8"),
    "gse6": ("nf4", _gse(6), 64, "GSQ-Tuning GSE-INT6"),
    "gse5": ("nf4", _gse(5), 64, "GSQ-Tuning GSE-INT5"),
    "int8-tensor": ("nf4", LoRAArithmetic(operands=IntFormat(bits=8, granularity="tensor"), saved="quantized"), 64,
                    "per-tensor INT8 (no shared exponents)"),
    "fp8": ("nf4", FP8Arithmetic(saved="quantized"), 64, "FP8: per-tensor E4M3 forward / E5M2 gradients"),
    "gse4": ("nf4", _gse(4), 64, "GSQ-Tuning GSE-INT4"),
    "gse5-r128": ("nf4", _gse(5), 128, "GSQ-Tuning GSE-INT5, rank 128"),
    "gse4-r128": ("nf4", _gse(4), 128, "GSQ-Tuning GSE-INT4, rank 128"),
}
PAPER = ("GSQ-Tuning (arXiv 2502.12913) reports accuracy comparable to BF16 fine-tuning with 1.85x less "
         "memory (ACL version: about 50 %), on LLaMA-class 7B-70B models; the spec's interim targets: GSE-INT8 "
         "within 0.5 points of BF16 LoRA, GSE-INT6 within about 1 point, GSE-INT5 with a larger rank inside "
         "BF16 +- 1, per-tensor INT8 no better than GSE-INT8, and FP8 (per-tensor scaled E4M3 forward / E5M2 backward) "
         "no better than GSE-INT8 (the paper: 5x lower power and 11x smaller chip area than FP8 at the same accuracy).")


def task_data(tokenizer, args) -> dict:
    train = source_items("train", args.train_items, 0, context_chars=args.context_chars)
    test = source_items(("validation", "test"), args.test_items, 1, context_chars=args.context_chars)
    tokens, mask = supervised_rows(train, tokenizer, args.seq_len)
    test_tokens, test_mask = supervised_rows(test, tokenizer, args.seq_len)
    return dict(train=(tokens, mask), test_items=test, test=(test_tokens, test_mask))


def evaluate(model, tokenizer, data, args) -> dict:
    tokens, mask = data["test"]
    nll = evaluate_loss(model, tokens, mask, args.batch_size)
    acc = evaluate_multiple_choice(model, tokenizer, data["test_items"], normalize="none",
                                   batch_size=args.batch_size, progress=False).accuracy
    return {"answer_nll": nll, "answer_ppl": float(np.exp(nll)), "accuracy": acc}


def adapted_model(name: str, bases: dict, args):
    """The setting's model with fresh adapters (the same initialisation for every setting)."""
    base_name, arithmetic, rank, _ = SETTINGS[name]
    return add_lora(bases[base_name], LoRAConfig(rank=rank, alpha=16.0, arithmetic=arithmetic),
                    key=jax.random.key(args.seed))


def batch_fn(data, args):
    """``step -> (tokens, mask)``: the training rows in one seeded order, cycled."""
    tokens, mask = data["train"]
    order = np.random.default_rng(args.seed).permutation(len(tokens))

    def batches(step):
        idx = order[(step * args.batch_size + np.arange(args.batch_size)) % len(tokens)]
        return tokens[idx], mask[idx]
    return batches


def finetune_config(args) -> FinetuneConfig:
    return FinetuneConfig(steps=args.steps, lr=args.lr, seed=args.seed)


def measure_memory(model, batches, args) -> dict:
    """Bytes per part of one training step on the first batch, with the optimizer ``finetune`` builds."""
    tokens, mask = batches(0)
    optimizer = nnx.Optimizer(model, finetune_config(args).optimizer(), wrt=LoRAParam)
    return training_memory(model, optimizer, lambda m: batch_loss(m, jnp.asarray(tokens), jnp.asarray(mask))).as_dict()


def run_setting(name: str, bases: dict, tokenizer, data, args) -> dict:
    base_name, arithmetic, rank, description = SETTINGS[name]
    model = adapted_model(name, bases, args)
    batches = batch_fn(data, args)
    memory = measure_memory(model, batches, args)
    start = time.perf_counter()
    tuned, history = finetune(model, batches, finetune_config(args), progress=args.progress)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(tuned, tokenizer, data, args)
    val = split_perplexity(tuned, tokenizer, "validation", 256, max_windows=args.windows, progress=False).ppl
    losses = [h["loss"] for h in history]
    return {"setting": name, "description": description, "base": base_name, "arithmetic": arithmetic.name,
            "rank": rank, "final_train_loss": float(np.mean(losses[-20:])), **metrics, "val_ppl": float(val),
            "memory_bytes": memory, "train_seconds": train_seconds,
            "seconds_per_step": float(np.median(np.diff([h["seconds"] for h in history]))),
            "loss_curve": losses}


def run(args: argparse.Namespace, results: Results) -> None:
    """The bases' scores before fine-tuning, then every chosen setting not yet in ``results`` (with
    ``--memory-only``: the memory of every setting already there, re-measured)."""
    lm = load(args.model, dtype="bfloat16", param_dtype="bfloat16")
    bases = {"bf16": lm.model, "nf4": jq.quantize(lm.model, NF4, progress=False)}
    data = task_data(lm.tokenizer, args)
    if "before" not in results.meta:
        results.set_meta(before={b: {**evaluate(m, lm.tokenizer, data, args),
                                     "val_ppl": split_perplexity(m, lm.tokenizer, "validation", 256,
                                                                 max_windows=args.windows, progress=False).ppl}
                                 for b, m in bases.items()})
    if args.memory_only:
        if not results.rows:
            raise SystemExit("--memory-only re-measures the settings of an existing JSON: add --resume")
        for row in list(results.rows):
            name = row["setting"]
            results.add({**row, "memory_bytes": measure_memory(adapted_model(name, bases, args), batch_fn(data, args),
                                                               args)})
        return
    for name in args.settings:
        if results.has(setting=name):
            continue
        print(f"== {name}", flush=True)
        results.add(run_setting(name, bases, lm.tokenizer, data, args))
        print({k: v for k, v in results.rows[-1].items() if k != "loss_curve"}, flush=True)


def legacy(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The older layout: ``config`` (with an output path), ``before`` and ``runs`` by setting."""
    run_args = {k: v for k, v in data["config"].items() if k not in ("settings", "out")}
    return {"script": "gsq_tuning", "command": "python experiments/gsq_tuning.py", "args": run_args,
            "key": ["setting"], "meta": {"before": data["before"]}, "rows": list(data["runs"].values())}


def upgrade_legacy_json(argv: list[str]) -> None:
    """With ``--resume``: rewrite the JSON the run resumes in the harness layout when it is in the older one (the
    same rows and meta, through ``legacy``), since ``harness.Results.open`` resumes only the harness layout."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--quick", action="store_true")
    pre.add_argument("--out", type=Path, default=harness.RESULTS)
    pre.add_argument("--report-only", nargs="*", default=None)
    args, _ = pre.parse_known_args(argv)
    path = args.out / ("gsq_tuning" + ("-quick" if args.quick else "") + ".json")
    if not args.resume or args.report_only is not None or not path.is_file():
        return
    data = json.loads(path.read_text())
    if isinstance(data, dict) and {"config", "before", "runs"} <= data.keys():
        harness.write_text_atomic(path, json.dumps(legacy(data, args), indent=1) + "\n")
        print(f"--resume: rewrote {path} (older layout) in the harness layout", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="QLoRA uses 2e-4 on 7B models; the 10 M-parameter model needs more in 150 steps")
    parser.add_argument("--train-items", type=int, default=2400)
    parser.add_argument("--test-items", type=int, default=405,
                        help="held-out items (validation + test passages; 135 per source)")
    parser.add_argument("--context-chars", type=int, default=160)
    parser.add_argument("--windows", type=int, default=40, help="256-token validation windows for val_ppl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-only", action="store_true",
                        help="with --resume: re-measure the memory of the settings already in the JSON (no training)")
    parser.add_argument("--progress", action="store_true")
    harness.add_arguments(parser, model="jq-llama-small")
    upgrade_legacy_json(sys.argv[1:])
    harness.run_experiment(parser, stem=lambda a: "gsq_tuning", key=("setting",), run=run, report=write_report,
                           legacy=legacy, volatile=("settings", "memory_only", "progress"),
                           quick={"settings": ["bf16", "gse8"], "steps": 3, "batch_size": 2, "train_items": 12,
                                  "test_items": 6, "windows": 2})


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f}"


def write_report(all_runs: list[Results], base: Path) -> None:
    """Write ``<base>.md`` and ``<base>.png``."""
    results = all_runs[0]
    runs = {r["setting"]: r for r in results.rows}
    cfg, before = results.args, results.meta.get("before", {})
    ref = runs.get("bf16")
    lines = [
        f"# GSQ-Tuning: integer LoRA fine-tuning ({cfg['model']})", "",
        f"Regenerate: `python experiments/gsq_tuning.py` (every setting; `--resume --settings NAME ...` adds settings "
        f"to `{base.name}.json`; the last run that wrote rows: `{results.command}`). "
        f"Model {cfg['model']} (bf16), task: name the source of an excerpt of at most "
        f"{cfg['context_chars']} characters; {cfg['steps']} steps of {cfg['batch_size']} rows x {cfg['seq_len']} "
        f"tokens, lr {cfg['lr']}, AdamW (0.9, 0.999), cosine with 3 % warm-up, clip 0.3; {cfg['test_items']} "
        f"held-out items (validation and test passages); validation perplexity on {cfg['windows']} windows of 256 "
        "tokens. CPU, float32 accumulation of the GSE GEMMs (equal to the int32 path up to float32 summation order; "
        "tests/finetune/test_lora_linear.py); the FP8 GEMMs multiply the float8 codes in float32 and rescale by the "
        "two tensor scales (tests/finetune/test_fp8_lora.py).", "",
        "Before fine-tuning: " + "; ".join(
            f"{b} base accuracy {v['accuracy']:.3f}, answer ppl {v['answer_ppl']:.2f}, val ppl {v['val_ppl']:.2f}"
            for b, v in before.items()) + ".", "",
        "| setting | GEMM operands | rank | train loss | answer ppl | accuracy | Δacc vs bf16 | val ppl | "
        "weights MiB | adapters+opt MiB | saved act. MiB | total MiB | total / bf16 | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        mem = r["memory_bytes"]
        dacc = f"{100 * (r['accuracy'] - ref['accuracy']):+.1f}" if ref else "-"
        ratio = f"{mem['total'] / ref['memory_bytes']['total']:.3f}" if ref else "-"
        lines.append(
            f"| {name} | {r['arithmetic']} | {r['rank']} | {r['final_train_loss']:.3f} | {r['answer_ppl']:.3f} | "
            f"{r['accuracy']:.3f} | {dacc} | {r['val_ppl']:.2f} | {_mib(mem['frozen_weights'])} | "
            f"{_mib(mem['adapters'] + mem['optimizer'])} | {_mib(mem['saved_activations'])} | {_mib(mem['total'])} | "
            f"{ratio} | {r['seconds_per_step']:.2f} |")
    lines += ["", "Δacc is in points. Memory is measured from the arrays of one training step "
              "(`jquant.finetune.memory.training_memory`): frozen weights as stored (NF4 codes + FP8 block "
              "constants, bf16 embeddings/head/norms), FP32 adapter masters and AdamW moments, and the residuals "
              "`jax.vjp` keeps for the backward pass (the adapted linears of the quantized-GEMM settings keep their "
              "inputs in GSE, int8 or float8 codes; attention, norms, SiLU and the loss keep bf16/f32 residuals in "
              "every setting).", "",
              *([harness.verdict(text), ""] if (text := verdict_text(runs, cfg)) is not None else []),
              "## The paper's claims", "", PAPER, ""]
    lines += summary(runs, before, cfg)
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    plot(runs, base.with_name(base.name + ".png"))


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def accuracy_tolerance(target_points: float, p_a: float, p_b: float, n: int) -> float:
    """Tolerance in points for |acc_a - acc_b| ≤ target over ``n`` items: the paper's target, widened to two
    standard errors of the difference of two accuracies, 2 sqrt(p_a(1-p_a)/n + p_b(1-p_b)/n), and never below one
    item's weight 1/n (differences smaller than noise or than one item cannot count against the claim)."""
    se = float(np.sqrt(p_a * (1 - p_a) / n + p_b * (1 - p_b) / n))
    return 100 * max(target_points / 100, 2 * se, 1 / n)


def _within(name: str, claim: str, target: float, runs: dict[str, dict], n: int) -> str:
    """One accuracy claim against bf16 LoRA with its noise-derived tolerance."""
    a, b = runs[name]["accuracy"], runs["bf16"]["accuracy"]
    tol, dacc = accuracy_tolerance(target, a, b, n), 100 * (a - b)
    widened = (f"; {n} items cannot resolve the paper's {target:g}-point target, so this only rules out larger gaps"
               if tol > target else "")
    return (f"- {claim}: {dacc:+.1f} points against a tolerance of ±{tol:.1f} points (the larger of the paper's "
            f"{target:g}, two standard errors of the difference over {n} items and one item{widened}), "
            f"{_verdict(abs(dacc) <= tol)}.")


ACCURACY_TARGETS = (("gse8", 0.5), ("gse6", 1.0), ("gse5-r128", 1.0), ("gse4-r128", 1.0))  # spec's interim targets
PAPER_MEMORY = 1.85  # the paper's memory reduction against BF16 fine-tuning


def verdict_text(runs: dict[str, dict], cfg: dict) -> str | None:
    """The paper's claim (accuracy comparable to BF16 LoRA at 1.85x less memory): the accuracy part holds when every
    spec target run is met within its noise-widened tolerance (``accuracy_tolerance``), the memory part when a GSE
    setting's training step takes at least 1.85x less memory than bf16 LoRA's. Both: reproduced; one: partly;
    none: not reproduced. None without the bf16 row, a target setting or a GSE memory row."""
    targets = [(name, t) for name, t in ACCURACY_TARGETS if name in runs]
    gse = [n for n in ("gse8", "gse6", "gse5", "gse4") if n in runs]
    if "bf16" not in runs or not targets or not gse:
        return None
    ref, n = runs["bf16"], int(cfg["test_items"])
    dacc = {name: 100 * (runs[name]["accuracy"] - ref["accuracy"]) for name, _ in targets}
    tol = {name: accuracy_tolerance(t, runs[name]["accuracy"], ref["accuracy"], n) for name, t in targets}
    acc_ok = all(abs(dacc[name]) <= tol[name] for name, _ in targets)
    saving = {g: ref["memory_bytes"]["total"] / runs[g]["memory_bytes"]["total"] for g in gse}
    mem_ok = max(saving.values()) >= PAPER_MEMORY
    category = "reproduced" if acc_ok and mem_ok else "partly reproduced" if acc_ok or mem_ok else "not reproduced"
    low, high = min(saving, key=saving.get), max(saving, key=saving.get)
    share = ref["memory_bytes"]["saved_activations"] / ref["memory_bytes"]["total"]
    return (f"{category}: {', '.join(name for name, _ in targets)} {'stay' if acc_ok else 'do not all stay'} within "
            f"noise of bf16 LoRA's accuracy ({', '.join(f'{dacc[name]:+.1f}' for name, _ in targets)} points against "
            f"tolerances up to ±{max(tol.values()):.1f}"
            + (f", so {n} items cannot resolve the spec's {min(t for _, t in targets):g}-{max(t for _, t in targets):g}"
               "-point targets" if all(tol[name] > t for name, t in targets) else "") + "); "
            f"a training step's memory falls {saving[low]:.2f}x ({low}) to {saving[high]:.2f}x ({high}) against the "
            f"paper's {PAPER_MEMORY:g}x, with saved activations {share:.0%} of bf16 LoRA's step at this size.")


def fp8_claim(runs: dict[str, dict], n: int) -> str:
    """Spec target 4, FP8 (per-tensor E4M3 forward / E5M2 backward) no better than GSE-INT8: met unless FP8's held-out
    accuracy exceeds GSE-INT8's by more than ``accuracy_tolerance(0, ...)`` (two standard errors of the difference
    over ``n`` items, at least one item). The answer loss and validation perplexity are reported as point comparisons
    (no standard error is recorded for them), not judged. "Not measured" without the fp8 or the gse8 row."""
    claim = "FP8 (per-tensor E4M3 forward / E5M2 gradients) no better than GSE-INT8"
    missing = [name for name in ("fp8", "gse8") if name not in runs]
    if missing:
        return (f"- {claim}: not measured (no {' or '.join(missing)} row; `--resume --settings {' '.join(missing)}` "
                "adds it).")
    f, g = runs["fp8"], runs["gse8"]
    tol, dacc = accuracy_tolerance(0.0, f["accuracy"], g["accuracy"], n), 100 * (f["accuracy"] - g["accuracy"])
    return (f"- {claim}: accuracy {f['accuracy']:.3f} vs {g['accuracy']:.3f}, {dacc:+.1f} points against a tolerance "
            f"of ±{tol:.1f} points (two standard errors of the difference over {n} items, at least one item), "
            f"{_verdict(dacc <= tol)}. Answer loss {f['answer_nll']:.4f} vs {g['answer_nll']:.4f} (FP8 "
            f"{'lower' if f['answer_nll'] < g['answer_nll'] else 'not lower'}) and validation ppl {f['val_ppl']:.2f} "
            f"vs {g['val_ppl']:.2f} are point comparisons (no standard error is recorded for them), not judged.")


def summary(runs: dict[str, dict], before: dict, cfg: dict) -> list[str]:
    """The spec's interim targets, the per-tensor INT8 and FP8 comparisons with GSE-INT8 and the memory claim,
    checked against the measured runs (the bf16 comparisons need the bf16 row; nothing without bf16 and gse8)."""
    if "bf16" not in runs and "gse8" not in runs:
        return []
    ref = runs.get("bf16")
    out = ["## What we measured", ""]
    n = int(cfg["test_items"])
    for name, claim, target in (("gse8", "GSE-INT8 within 0.5 points of bf16 LoRA", 0.5),
                                ("gse6", "GSE-INT6 within about 1 point", 1.0),
                                ("gse5-r128", "gse5-r128 inside bf16 +- 1 point", 1.0),
                                ("gse4-r128", "gse4-r128 inside bf16 +- 1 point", 1.0)):
        if name in runs and ref is not None:
            out.append(_within(name, claim, target, runs, n))
    if "int8-tensor" in runs and "gse8" in runs:
        t, g = runs["int8-tensor"], runs["gse8"]
        tol = accuracy_tolerance(0.0, t["accuracy"], g["accuracy"], n)
        out.append(f"- Per-tensor INT8 no better than GSE-INT8: answer loss {t['answer_nll']:.4f} vs {g['answer_nll']:.4f} "
                   f"(a point comparison: no standard error is recorded for the loss), accuracy {t['accuracy']:.3f} vs "
                   f"{g['accuracy']:.3f} (tolerance ±{tol:.1f} points), validation ppl {t['val_ppl']:.2f} vs "
                   f"{g['val_ppl']:.2f}: {_verdict(t['answer_nll'] >= g['answer_nll'] and 100 * (t['accuracy'] - g['accuracy']) <= tol)}.")
    out.append(fp8_claim(runs, n))
    for name in ("qlora", "gse8", "gse5", "gse4", "fp8"):
        if name in runs and ref is not None:
            m, b = runs[name]["memory_bytes"], ref["memory_bytes"]
            out.append(f"- {name} memory vs bf16 LoRA: total {b['total'] / m['total']:.2f}x less (frozen weights "
                       f"{b['frozen_weights'] / m['frozen_weights']:.2f}x, saved activations "
                       f"{b['saved_activations'] / m['saved_activations']:.2f}x); the paper reports 1.85x.")
    best = max(runs.values(), key=lambda r: r["accuracy"])["accuracy"]
    worst = min(runs.values(), key=lambda r: r["accuracy"])["accuracy"]
    out += ["", f"All settings land between {worst:.3f} and {best:.3f} accuracy: on this task every arithmetic "
            "down to 4-bit GEMM operands learns the labels, so accuracy barely separates them; the held-out answer "
            f"loss is the finer measure. At this model's size and {cfg['seq_len']}-token rows the saved activations "
            "(attention, norms, SiLU, logits: residuals outside the adapted GEMMs) dominate the step's memory, so "
            "the paper's 1.85x, which comes from 7B-70B weights, cannot show here; the frozen-weight saving does."]
    if before and ref is not None:
        most = max(runs, key=lambda n: runs[n]["val_ppl"])
        out += ["", f"Fine-tuning on the answer tokens alone raises validation perplexity from "
                f"{before['bf16']['val_ppl']:.1f} (before) to {ref['val_ppl']:.1f} (bf16 LoRA) and similar "
                f"values in every setting (highest: {most}, {runs[most]['val_ppl']:.1f}); lower-bit GEMMs do not protect "
                "general text."]
    return out


def operand_bits(name: str) -> int:
    """Bits of a setting's GEMM operands (16 for the bf16 GEMMs of LoRA and QLoRA, 8 for FP8)."""
    operands = SETTINGS[name][1].operands
    if operands is None:
        return 16
    return operands.el.bits if isinstance(operands, FP8Format) else operands.bits


def plot(runs: dict[str, dict], path: Path) -> None:
    """Accuracy and training-step memory against GEMM operand bits, and the loss curves."""
    if not runs:
        return
    fig, ((ax1, ax3),) = harness.figure(1, 2, size=(6, 4.2))
    ax2 = ax1.twinx()
    for name, r in runs.items():
        bits = operand_bits(name) + {"qlora": 0.25, "fp8": -0.25}.get(name, 0.0)  # keep LoRA/QLoRA, FP8/INT8 apart
        marker = "s" if r["rank"] > 64 else {"int8-tensor": "^", "fp8": "D"}.get(name, "o")
        ax1.scatter(bits, r["accuracy"], marker=marker, color="tab:blue")
        ax1.annotate(name, (bits, r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax2.scatter(bits, r["memory_bytes"]["total"] / 2 ** 20, marker=marker, color="tab:red", alpha=0.6)
        curve = np.convolve(r["loss_curve"], np.ones(10) / 10, mode="valid")
        ax3.plot(np.arange(len(curve)) + 10, curve, label=name)
    ax1.set_xlabel("GEMM operand bits (16 = bf16; square: rank 128; triangle: per-tensor int8; diamond: fp8)")
    ax1.set_ylabel("held-out accuracy", color="tab:blue")
    ax2.set_ylabel("training-step memory (MiB)", color="tab:red")
    ax1.set_title("accuracy and memory vs bits")
    ax3.set_xlabel("step")
    ax3.set_ylabel("answer loss (10-step mean)")
    ax3.set_yscale("log")
    ax3.legend(fontsize=7)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
