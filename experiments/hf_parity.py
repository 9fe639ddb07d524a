"""jquant-vs-transformers logit parity for every Llama-family case -> experiments/results/hf_parity.md (+ .json).

    python experiments/hf_parity.py                           # every case (about a minute on 2 cores)
    python experiments/hf_parity.py --cases qwen3-qk-norm     # one case (with --resume: added to the JSON)
    python experiments/hf_parity.py --report-only             # rebuild hf_parity.md from hf_parity.json
    python experiments/hf_parity.py --quick --out /tmp/p      # smoke run: one case

Relative error = max |ours - transformers| / max |transformers| over a [2, 12] batch of
random tokens (seed 0), for prefill and for token-by-token decoding with the KV cache, in
float32 and float64. Each case's tiny random model is seeded by its index in the sorted
case list, so a case gives the same model whichever cases run.
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

import harness
from harness import Column, Results

# jax, torch and jquant are imported where they are used: --help and --report-only need none of them.
# The case names of jquant.testing.hf_reference.LLAMA_FAMILY_CASES, sorted (checked against it when a run starts).
CASES = ("llama2-mha-tied-bias", "llama3-gqa-untied", "mistral-sliding-window", "qwen2-qkv-bias", "qwen3-qk-norm")
ERRORS = (("fp32 prefill", "fp32_prefill"), ("fp32 decode", "fp32_decode"), ("fp64 prefill", "fp64_prefill"),
          ("fp64 decode", "fp64_decode"))
# The parity target: tests/models/test_llama_hf_parity.py's tolerances on the same relative error.
TOLERANCE = {"fp32": 1e-5, "fp64": 2e-6}


def _decode(model, tokens):
    """Logits ``[B, T, V]`` of feeding ``tokens [B, T]`` one position at a time through the KV cache."""
    import numpy as np

    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = model.step(tokens[:, t : t + 1], cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def _errors(case: str, seed: int, tokens) -> dict[str, Any]:
    """The four relative errors of one case's model (written to a temporary ``save_pretrained`` folder)."""
    from jquant.models import llama
    from jquant.testing.hf_reference import build_llama_family, relative_error, torch_logits

    with tempfile.TemporaryDirectory() as folder:
        hf = build_llama_family(case, folder, seed=seed)
        ref32 = torch_logits(hf, tokens)
        ref64 = torch_logits(hf.double(), tokens)
        m32 = llama.from_hf(folder)
        m64 = llama.from_hf(folder, dtype="float64")
        return {"case": case, "fp32_prefill": relative_error(m32(tokens), ref32),
                "fp32_decode": relative_error(_decode(m32, tokens), ref32),
                "fp64_prefill": relative_error(m64(tokens), ref64),
                "fp64_decode": relative_error(_decode(m64, tokens), ref64)}


def run(args: argparse.Namespace, results: Results) -> None:
    """One row per case of ``args.cases`` not already in ``results``."""
    import jax
    import numpy as np
    import transformers

    from jquant.testing.hf_reference import LLAMA_BASE, LLAMA_FAMILY_CASES

    if tuple(sorted(LLAMA_FAMILY_CASES)) != CASES:
        raise SystemExit(f"hf_parity.CASES {CASES} is out of date: jquant.testing.hf_reference has "
                         f"{tuple(sorted(LLAMA_FAMILY_CASES))}")
    jax.config.update("jax_enable_x64", True)
    results.set_meta(transformers=transformers.__version__, jax=jax.__version__)
    tokens = np.random.default_rng(0).integers(3, LLAMA_BASE["vocab_size"], size=(2, 12)).astype(np.int32)
    for case in args.cases:
        if not results.has(case=case):
            results.add(_errors(case, CASES.index(case), tokens))
            print(results.rows[-1], flush=True)


def _verdict(rows: list[dict[str, Any]]) -> str:
    """``met`` when every case's prefill and decode errors are below the parity tests' tolerance of their dtype."""
    worst = {d: max((r[k], r["case"], h) for r in rows for h, k in ERRORS if k.startswith(d)) for d in TOLERANCE}
    met = all(worst[d][0] < TOLERANCE[d] for d in TOLERANCE)
    return (f"{'met' if met else 'not met'}: the largest relative error of jquant's logits against transformers' "
            f"over {len(rows)} cases, prefill and KV-cache decode, is "
            + " and ".join(f"{e:.2e} in {d} ({case}, {h.split()[1]}; tolerance {TOLERANCE[d]:.0e})"
                           for d, (e, case, h) in worst.items()) + ".")


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``: one line per case, in the order of ``CASES``."""
    results = runs[0]
    rows = sorted(results.rows, key=lambda r: CASES.index(r["case"]) if r["case"] in CASES else len(CASES))
    lines = [f"# Llama-family parity with transformers {results.meta['transformers']}", "",
             "Relative error max|ours - hf| / max|hf| of logits, tiny random models with every tensor perturbed,",
             "read from `save_pretrained` folders. transformers computes RMSNorm and softmax in float32 even in",
             "float64 mode, which bounds the float64 column.", "",
             *harness.table(rows, [Column("case", "case"), *(Column(h, k, ".2e") for h, k in ERRORS)]), "",
             *([harness.verdict(_verdict(rows)), ""] if rows else []), harness.reproduce(results.command)]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE",
                        help="cases to run (default: all of %(choices)s)")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "hf_parity", key=("case",), run=run, report=report,
                           volatile=("cases",), quick={"cases": [CASES[-1]]})


if __name__ == "__main__":
    main()
