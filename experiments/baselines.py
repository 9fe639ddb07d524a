"""Quantization baselines on a bundled reference model -> experiments/results/baselines.md (+ .json).

    python experiments/baselines.py                        # jq-llama-small, all recipes
    python experiments/baselines.py --windows 160 --items 200 --calib 64   # about 25 min on 2 cores

RTN vs GPTQ at W8, W4 g128, W3 g128 and W2 g64 (asymmetric), fp8 / NVFP4 /
MXFP4 weight-only and W8A8 (int8 and fp8), all with embeddings and lm_head
kept in bf16. Calibration: 128 random 256-token windows of the train split
(key 0) by default. Evaluation: validation perplexity (256-token windows) and zero-shot
accuracy on the test split. Size counts every stored array (codes, scales,
zero points) plus the float embeddings and head.
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

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ["rtn-w8", "gptq-w8", "rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128", "rtn-w2g64", "gptq-w2g64",
           "fp8-w8a16", "nvfp4-w4a16", "mxfp4-w4a16", "rtn-w8a8", "rtn-w8a8-static", "fp8-w8a8"]
TASKS = ("next_line", "same_source")


def evaluate(model, tokenizer, windows, n_items: int) -> dict:
    size = jq.size_report(model)
    zs = zero_shot(model, tokenizer, TASKS, n_items=n_items, progress=False)
    return {"ppl": perplexity(model, windows, batch_size=16, progress=False).ppl,
            **{t: zs[t].accuracy for t in TASKS}, "mb": size.megabytes, "bits": size.bits_per_parameter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jq-llama-small")
    parser.add_argument("--windows", type=int, default=None, help="validation windows (default: the whole split)")
    parser.add_argument("--items", type=int, default=200, help="zero-shot items per task (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=128, help="calibration windows (default: %(default)s)")
    args = parser.parse_args()
    loaded = load(args.model)
    tok = loaded.tokenizer
    windows = token_windows(load_split("validation"), tok, 256, max_windows=args.windows)
    calib = random_windows(load_split("train"), tok, args.calib, 256, jax.random.key(0))
    n_items = args.items
    rows = [{"recipe": "float (bf16)", "seconds": 0.0, **evaluate(loaded.model, tok, windows, n_items)}]
    print(rows[-1], flush=True)
    for name in RECIPES:
        t0 = time.perf_counter()
        qmodel = jq.quantize(loaded.model, name, calib, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"recipe": name, "seconds": seconds, **evaluate(qmodel, tok, windows, n_items)})
        print(rows[-1], flush=True)
    stem = f"baselines{'-' + args.model if args.model != 'jq-llama-small' else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# Quantization baselines on {args.model}", "",
             f"Validation perplexity over {len(windows)} windows of 256 tokens; zero-shot accuracy on {n_items} items per "
             "task (test split; chance: next_line 0.25, same_source 0.33); size of all parameters (embeddings and "
             f"lm_head stay bf16); GPTQ calibrated on {len(calib)} random 256-token train windows. "
             f"Reproduce: `python experiments/baselines.py --model {args.model}"
             f"{f' --windows {args.windows}' if args.windows else ''} --items {n_items} --calib {len(calib)}`.", "",
             "| recipe | ppl | next_line | same_source | size (MB) | bits/param | time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['ppl']:.2f} | {r['next_line']:.3f} | {r['same_source']:.3f} | {r['mb']:.2f} | "
                     f"{r['bits']:.2f} | {r['seconds']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
