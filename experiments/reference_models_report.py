"""Evaluate the bundled reference models -> experiments/results/reference_models.md (+ .json).

    python experiments/reference_models_report.py                               # every bundled model
    python experiments/reference_models_report.py --models jq-llama-small jq-llama-tiny
    python experiments/reference_models_report.py --resume --part outliers --models jq-llama-tiny jq-llama-small \
        jq-llama-long jq-moe-small jq-mamba-small jq-rwkv6-small                # outlier statistics only
    python experiments/reference_models_report.py --report-only                 # rebuild the .md from the .json
    python experiments/reference_models_report.py --quick --out /tmp/r         # smoke run: jq-llama-tiny, a few items

Evaluation part: parameters, training tokens and CPU time (from each model's
reference_info.json, written at training time), then validation perplexity
and zero-shot accuracy measured now on the shipped weights. ``--models`` only
chooses which models run, so ``--resume`` adds models to an existing JSON.

Outlier part (``jquant.eval.outliers`` on ``OUTLIER_SEQUENCES`` random train windows of ``OUTLIER_LENGTH``
tokens): per site kind (the sites sharing one input, e.g. q/k/v), the max/median channel absmax ratio, the
max/median channel RMS ratio and the Gaussian-channel kurtosis, median and maximum over layers; per block, the
residual stream's kurtosis and massive activations (max |x| / median |x|, Sun et al. 2024); for MoE models the
routed tokens per expert (MoEQuant's σ). The reading compares them with the outlier sizes the specs use or quote
and says, per method, whether the phenomenon it targets is present.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import harness
from harness import Column, Results

# jquant is imported where it is used: --help and --report-only do not need it.
TASKS = ("next_line", "same_source")
CHANCE = {"next_line": 1 / 4, "same_source": 1 / 3}
MAX_ITEMS = 200  # the most zero-shot items per task the Milton part of the test split allows


def evaluate(name: str, items: int, windows: int | None) -> dict[str, Any]:
    """One model's row: its reference_info.json, then the perplexity and zero-shot accuracy measured now."""
    from jquant.data import load_split, token_windows
    from jquant.eval import perplexity, zero_shot
    from jquant.models import list_models, load

    info = next(i for i in list_models() if i.name == name)
    loaded = load(name)
    seq_len = info.info.get("validation_seq_len", 256)
    ppl = perplexity(loaded.model, token_windows(load_split("validation"), loaded.tokenizer, seq_len,
                                                 max_windows=windows), batch_size=16)
    zs = zero_shot(loaded.model, loaded.tokenizer, TASKS, n_items=items)
    return {"name": name, **info.info, "measured_validation_ppl": ppl.ppl,
            **{f"zero_shot_{t}": zs[t].accuracy for t in TASKS}}


OUTLIER_SEQUENCES, OUTLIER_LENGTH = 16, 256  # random train windows for the outlier statistics
LLM_FAMILIES = ("llama", "moe", "mamba", "mamba2", "rwkv6")  # families whose outliers are measured


def _family(info) -> str | None:
    """A bundled model's family: its reference_info.json's, else its config.json's model_type."""
    config = info.path / "config.json"
    return info.info.get("family") or (json.loads(config.read_text()).get("model_type") if config.is_file() else None)


def outliers(name: str) -> dict[str, Any]:
    """One model's outlier statistics (module docstring) on random train windows, as JSON-ready numbers."""
    import dataclasses

    import jax

    from jquant.data import load_split, random_windows
    from jquant.eval.experts import ExpertUsage
    from jquant.eval.outliers import model_outliers
    from jquant.models import load

    loaded = load(name)
    tokens = random_windows(load_split("train"), loaded.tokenizer, OUTLIER_SEQUENCES, OUTLIER_LENGTH,
                            jax.random.key(0))
    report = model_outliers(loaded.model, tokens, batch_size=8)
    experts = {p.rsplit("/", 1)[0]: s.group_tokens for p, s in report.sites.items() if s.group_tokens is not None}
    usage = None
    if experts:
        layers = tuple(sorted(experts, key=lambda p: [int(t) if t.isdigit() else 0 for t in p.split("/")]))
        usage = ExpertUsage(layers=layers, counts=np.array([experts[p] for p in layers])).to_dict()
    return {"sequences": OUTLIER_SEQUENCES, "length": OUTLIER_LENGTH,
            "sites": {p: dataclasses.asdict(s) for p, s in report.sites.items()},
            "blocks": [{"block": p, **dataclasses.asdict(h)} for p, h in report.blocks],
            "output": dataclasses.asdict(report.output), "experts": usage}


def run(args: argparse.Namespace, results: Results) -> None:
    """For ``--part evaluation`` (or all) one row per model of ``args.models`` (default: every bundled model) not
    already in ``results``; for ``--part outliers`` (or all) the outlier statistics of every language model among
    them not already in ``results.meta["outliers"]``."""
    from jquant.models import list_models

    infos = {i.name: i for i in list_models()}
    unknown = sorted(set(args.models or ()) - set(infos))
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} not bundled; choose from {', '.join(infos)}")
    for name in args.models or infos:
        if args.part in ("all", "evaluation") and not results.has(name=name):
            results.add(evaluate(name, args.items, args.windows))
        done = results.meta.get("outliers", {})
        if args.part in ("all", "outliers") and _family(infos[name]) in LLM_FAMILIES and name not in done:
            print(f"outliers: {name}", flush=True)
            results.set_meta(outliers={**done, name: outliers(name)})


def regenerate_command(results: Results) -> str:
    """The commands that rebuild this file's rows and outlier statistics (``--models`` only picks the models a run
    adds, so the recorded command line is the last run's, not the whole file's)."""
    script = "python experiments/reference_models_report.py"
    evaluated = [r["name"] for r in results.rows]
    measured = list(results.meta.get("outliers", {}))
    if evaluated == measured:
        return f"{script} --models {' '.join(evaluated)}"
    parts = [f"{script} --part evaluation --models {' '.join(evaluated)}" if evaluated else None,
             f"{script} --resume --part outliers --models {' '.join(measured)}" if measured else None]
    return "`, then `".join(p for p in parts if p)


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``: the table, then every row's numbers as JSON."""
    results = runs[0]
    items, windows = results.args["items"], results.args["windows"]
    columns = [Column("model", "name"), Column("params", lambda r: f"{r['parameters'] / 1e6:.2f}M"),
               Column("train tokens", lambda r: f"{r['train_tokens'] / 1e6:.1f}M"),
               Column("CPU train time", lambda r: f"{r['train_seconds'] / 60:.0f} min"),
               Column("val ppl", "measured_validation_ppl", ".2f"),
               *(Column(t, f"zero_shot_{t}", ".3f") for t in TASKS)]
    which = "non-overlapping" if windows is None else f"the first {windows} non-overlapping"
    most = " (the most the Milton part of the test split allows)" if items == MAX_ITEMS else ""
    lines = [
        "# Bundled reference models",
        "",
        f"Validation perplexity over {which} 256-token windows of the validation split (bf16 weights,",
        f"float32 compute); zero-shot accuracy on {items} items per task{most} from the test split (chance: "
        + ", ".join(f"{t} {c:.2f}" for t, c in CHANCE.items()) + ").",
        "",
        *harness.table(results.rows, columns),
        "",
        harness.reproduce(regenerate_command(results)),
        "",
        *outlier_section(results.meta.get("outliers", {})),
        "Raw numbers:", "", "```json", json.dumps(results.rows, indent=1, default=str), "```"]
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(results.rows)]))


OUTLIER_FACTOR = 10.0  # the smallest factor the specs plant to mimic real outlier channels (skvq.md §5: ×10–20)
MASSIVE_TOP, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al. 2024: |x| > 100 and about 1000× the median |x|
SITE_COLUMNS = [Column("input of", "kind"), Column("layers", "layers"),
                Column("absmax max/median (median, max over layers)", lambda r: f"{r['absmax'][0]:.1f}, {r['absmax'][1]:.1f}"),
                Column("RMS max/median", lambda r: f"{r['rms'][0]:.1f}, {r['rms'][1]:.1f}"),
                Column("channel kurtosis", lambda r: f"{r['kurt'][0]:.1f}, {r['kurt'][1]:.1f}"),
                Column("top channel (layers)", "channels")]
BLOCK_COLUMNS = [Column("hidden state", "block"), Column("kurtosis", "kurtosis", ".1f"), Column("max abs(x)", "top", ".3g"),
                 Column("median abs(x)", "median", ".3g"), Column("max / median", "top_over_median", ".0f"),
                 Column("position of max", "top_token"), Column("channel of max", "top_channel")]


def _site_kinds(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site kind (the sites of a block reading one input, e.g. q/k/v), the median and maximum over layers of
    each channel statistic and the top channel of each layer."""
    prefixes = [b["block"] + "/" for b in stats["blocks"]]
    by_rel: dict[str, list[dict]] = {}
    for path, site in stats["sites"].items():
        prefix = next(p for p in prefixes if path.startswith(p))
        by_rel.setdefault(path[len(prefix):], []).append(site)
    same = lambda a, b: all(a[k] == b[k] for k in ("absmax_ratio", "rms_ratio", "channel_kurtosis", "tokens"))  # noqa: E731
    kinds: list[list[str]] = []
    for rel in by_rel:  # sites whose statistics are identical in every layer share their input
        home = next((k for k in kinds if len(by_rel[k[0]]) == len(by_rel[rel])
                     and all(map(same, by_rel[k[0]], by_rel[rel]))), None)
        home.append(rel) if home is not None else kinds.append([rel])
    rows = []
    for kind in kinds:
        sites = by_rel[kind[0]]
        pick = lambda key: np.array([s[key] for s in sites])  # noqa: E731
        agg = lambda key: (float(np.median(pick(key))), float(pick(key).max()))  # noqa: E731
        rows.append({"kind": " = ".join(kind), "layers": len(sites), "absmax": agg("absmax_ratio"),
                     "rms": agg("rms_ratio"), "kurt": agg("channel_kurtosis"),
                     "channels": ", ".join(str(s["top_channel"]) for s in sites)})
    return rows


def _massive(h: dict[str, Any]) -> bool:
    return h["top"] > MASSIVE_TOP and h["top_over_median"] > MASSIVE_RATIO


def _verdict(present: dict[str, dict[str, bool]], largest: dict[str, Any]) -> str:
    """Whether the reference models show the outliers the papers report in real LLMs: ``reproduced`` when every
    phenomenon of ``present`` (phenomenon -> model -> present) is present in every model, ``not reproduced`` when none
    is in any, ``partly reproduced`` otherwise; ``largest`` is the hidden state with the largest max/median."""
    counts = {k: [m for m, yes in v.items() if yes] for k, v in present.items()}
    n = len(next(iter(present.values())))
    category = ("reproduced" if all(len(v) == n for v in counts.values()) else
                "not reproduced" if not any(counts.values()) else "partly reproduced")
    where = lambda k: f"{len(counts[k])} of {n} models" + (  # noqa: E731
        f" ({', '.join(counts[k])})" if counts[k] else "")
    return (f"{category}: channel outliers in linear inputs (max/median channel absmax ≥ {OUTLIER_FACTOR:g}×, the "
            f"specs' ×10–20) appear in {where('channels')} and uneven channel variances (RMS ratio ≥ "
            f"{OUTLIER_FACTOR:g}×) in {where('variance')}; massive activations in {where('massive')}, the largest "
            f"max/median being {largest['top_over_median']:.0f}× ({largest['model']}, {largest['block']}) against "
            "about 10⁴ in LLaMA2-7B (Sun et al. 2024).")


def outlier_presence(stats: dict[str, Any]) -> dict[str, Any]:
    """One model's largest outliers (its entry of ``meta["outliers"]``): the site kind with the largest channel
    absmax ratio and the one with the largest RMS ratio (maxima over layers), the hidden state with the largest
    max/median, and whether each counts as present (``OUTLIER_FACTOR``, ``_massive``)."""
    kinds = _site_kinds(stats)
    hidden = [*stats["blocks"], {"block": "output", **stats["output"]}]
    worst = max(kinds, key=lambda k: k["absmax"][1])
    loudest = max(kinds, key=lambda k: k["rms"][1])
    big = max(hidden, key=lambda h: h["top_over_median"])
    return {"kinds": kinds, "hidden": hidden, "worst": worst, "loudest": loudest, "big": big,
            "channels": worst["absmax"][1] >= OUTLIER_FACTOR, "variance": loudest["rms"][1] >= OUTLIER_FACTOR,
            "massive": _massive(big)}


def presence_sentence(name: str, stats: dict[str, Any]) -> str:
    """``outlier_presence`` of one model in words, for the readings of the methods that target outliers."""
    o = outlier_presence(stats)
    word = lambda yes: "present" if yes else "absent"  # noqa: E731
    return (f"{name}: channel absmax ratio up to {o['worst']['absmax'][1]:.1f}× ({o['worst']['kind']}; "
            f"{word(o['channels'])} at ≥ {OUTLIER_FACTOR:g}×), channel RMS ratio up to {o['loudest']['rms'][1]:.1f}× "
            f"({word(o['variance'])}), residual-stream max/median up to {o['big']['top_over_median']:.0f}× (massive "
            f"activations {word(o['massive'])})")


def outlier_section(by_model: dict[str, dict[str, Any]]) -> list[str]:
    """The outlier statistics' tables and reading (every number formatted from ``by_model``)."""
    if not by_model:
        return []
    first = next(iter(by_model.values()))
    lines = ["## Outlier statistics", "",
             f"On {first['sequences']} random train windows of {first['length']} tokens per model "
             "(`jquant.eval.outliers`). Site inputs: max/median over channels of the channel absmax and of the "
             "channel RMS, and the channel kurtosis 3 d Σσ_c⁴ / (Σσ_c²)² (3 when all channels have equal RMS, "
             "d·3 when one channel holds all the energy), each as median and maximum over the layers. Hidden states "
             "(the residual stream entering each block, and leaving the last): Pearson kurtosis of the entries "
             "and max |x| / median |x| (Sun et al. 2024 call an activation massive when |x| > "
             f"{MASSIVE_TOP:g} and about {MASSIVE_RATIO:g}× the median; they report ratios near 10⁴ in LLaMA2-7B).", ""]
    verdicts: dict[str, list[str]] = {"channels": [], "massive": [], "variance": [], "experts": []}
    present: dict[str, dict[str, bool]] = {"channels": {}, "variance": {}, "massive": {}}
    largest: dict[str, Any] = {"top_over_median": -1.0}
    for name, stats in by_model.items():
        o = outlier_presence(stats)
        kinds, hidden, worst, loudest, big = o["kinds"], o["hidden"], o["worst"], o["loudest"], o["big"]
        lines += [f"### {name}", "", *harness.table(kinds, SITE_COLUMNS), "", *harness.table(hidden, BLOCK_COLUMNS), ""]
        for phenomenon in present:
            present[phenomenon][name] = o[phenomenon]
        if big["top_over_median"] > largest["top_over_median"]:
            largest = {"model": name, **big}
        verdicts["channels"].append(f"{name} {worst['absmax'][1]:.1f}× ({worst['kind']}): "
                                    + ("present" if worst["absmax"][1] >= OUTLIER_FACTOR else "absent"))
        channels = [h["top_channel"] for h in hidden]
        common = max(set(channels), key=channels.count)
        verdicts["massive"].append(f"{name} {big['top_over_median']:.0f}× at {big['block']} (max |x| "
                                   f"{big['top']:.3g}; channel {common} holds the maximum in {channels.count(common)} "
                                   f"of {len(hidden)} hidden states): " + ("present" if _massive(big) else "absent"))
        verdicts["variance"].append(f"{name} {loudest['rms'][1]:.1f}× ({loudest['kind']}): "
                                    + ("present" if loudest["rms"][1] >= OUTLIER_FACTOR else "absent"))
        if stats.get("experts"):
            e = stats["experts"]
            counts = np.array(e["counts"], float)
            lines += [f"Routed tokens per expert (top-k assignments, per layer): σ = {e['sigma']:.4f} (MoEQuant's "
                      f"balance measure), busiest / least-used expert {e['max_over_min_share']:.2f}×; "
                      + "; ".join(f"{layer}: " + ", ".join(str(int(c)) for c in row)
                                  for layer, row in zip(e["layers"], counts)) + ".", ""]
            verdicts["experts"].append(f"{name} σ {e['sigma']:.4f}, busiest / least-used {e['max_over_min_share']:.2f}×")
    lines += ["### Reading: is each method's target phenomenon present?", "",
              harness.verdict(_verdict(present, largest)), "",
              f"- Channel outliers in linear inputs (SmoothQuant-style smoothing, OSTQuant's scalings and rotation, "
              f"QuaRot/SpinQuant rotations, MQuant): the specs plant ×10–20 channels to mimic real models "
              f"(`/work/shared/specs/skvq.md` §5: k_proj rows ×10–20; `/work/shared/specs/mambaquant.md` §5: norm gains "
              f"×20; `/work/shared/specs/video_dit_mixed_precision_tdc.md` §3.4: an input is an outlier layer when "
              f"max|X| / mean|X| > 25). Largest max/median channel absmax ratio, counted present at "
              f"≥ {OUTLIER_FACTOR:g}×: " + "; ".join(verdicts["channels"]) + ".",
              "- Massive activations in the residual stream (rotation methods spread them; WKVQuant's MAE loss is "
              "chosen against them, `/work/shared/specs/wkvquant.md` §3.4): largest max/median: "
              + "; ".join(verdicts["massive"]) + ".",
              f"- Uneven channel variances (MambaQuant's target: Hadamard evens maxima but not variances, "
              f"`/work/shared/specs/mambaquant.md` §2): largest max/median channel RMS ratio, present at "
              f"≥ {OUTLIER_FACTOR:g}×: " + "; ".join(verdicts["variance"]) + "."]
    if verdicts["experts"]:
        lines.append("- Inter-expert imbalance on ordinary text (MoEQuant's EBSS, `/work/shared/specs/moequant.md` §2: "
                     "a domain-specific set routes unevenly): " + "; ".join(verdicts["experts"])
                     + " (see `moe.md` for σ of the calibration sets and EBSS's balance gate).")
    lines += ["- Weight outliers (RWKVQuant's proxy, `/work/shared/specs/rwkvquant.md` §3.2, a 20× outlier) and "
              "key-channel outliers of the KV cache (SKVQ, WKVQuant) are properties of weights and keys, not of the "
              "site inputs measured here: see `rwkvquant.md`'s proxy table and `kvcache.md`.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="models to evaluate (default: every bundled model)")
    parser.add_argument("--items", type=int, default=MAX_ITEMS,
                        help="zero-shot items per task (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=None,
                        help="validation windows (default: the whole split)")
    parser.add_argument("--part", choices=("all", "evaluation", "outliers"), default="all",
                        help="which part runs: perplexity and zero-shot rows, outlier statistics, or both")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "reference_models", key=("name",), run=run, report=report,
                           volatile=("models", "part"), quick={"models": ["jq-llama-tiny"], "items": 8, "windows": 2})


if __name__ == "__main__":
    main()
