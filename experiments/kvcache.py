"""KV-cache quantization results: FP vs RTN vs KIVI vs SKVQ vs WKVQuant -> experiments/results/kvcache.md.

    python experiments/kvcache.py --only "FP16 cache" "RTN K4V4" --depths 0 0.5 1 --needles-per-depth 1 \\
        --needle-batch 3                          # retrieval for the FP16 and RTN K4V4 rows, then
    python experiments/kvcache.py --resume --skip-retrieval  # every other row, without retrieval (~2.5 h on 2 CPU
                                                  # cores, estimated: 53 evaluations of ~2 min, WKVQuant's training)
    python experiments/kvcache.py --report-only   # rebuild the markdown from kvcache.json
    python experiments/kvcache.py --quick --out /tmp/k  # smoke run: the K2V2 rows, seeds 0 1, short windows, no
                                                  # retrieval

Rows are saved as they finish. ``--only`` (re)runs the named rows (at every seed for a row that calibrates),
``--skip-retrieval`` and the needle arguments change what the next rows measure: none of them is part of the run's
identity, so ``--resume`` adds or replaces rows in an existing kvcache.json (each row records its own retrieval
settings) and the report lists every command that wrote rows.

Rows, at each setting K4V4, K2V2, K2V1.5 (token groups of 32 channels unless said otherwise):

- ``RTN``: per-token min-max groups, fp16 scale/zero, no token kept exact; ``RTN head groups``: one group per head
  (``head_dim`` channels), fp16 scale/zero: WKVQuant's layout, so the same bits per element as WKVQuant;
- ``KIVI``: keys per channel over blocks of 32 tokens (the incomplete block exact), values per token;
  ``KIVI sink5``: + the first 5 tokens exact; ``KIVI sink5 window128``: + the 128 most recent tokens exact too
  (SKVQ's exact tokens);
- ``SKVQ``: k-means channel clusters (32 channels on average, over both heads), clip 0.92, fp8 scale/zero, keys
  before RoPE, sink 5 + window 128 (the README's setting); ``SKVQ window0``: the same with the sink only (the
  paper's perplexity setting, window 0, sink 5);
- ``WKVQuant``: KV only (weights float): head groups, fp16 scale/zero, channel smoothing learned with CRR,
  past-only attention, keys after RoPE;

then RTN W4 (g128) weights with the FP16 cache, with RTN KV4 (groups of 32, and head groups at WKVQuant's bits), and
WKVQuant W4KV4; and WKVQuant's ingredients one at a time at K2V2 (``RTN head groups K2V2`` -> ``+ past-only`` ->
``+ smoothing (init)`` -> ``WKVQuant K2V2``, which adds the CRR training).

Calibration draws: for each of ``--seeds`` (0 1 2 by default) the rows that calibrate (SKVQ's clusters, WKVQuant's
smoothing and training) draw their own random training-split windows (``jax.random.key(seed)``, which also seeds
SKVQ's k-means and WKVQuant's batch order); rows that do not calibrate (FP16, RTN, KIVI, RTN W4:
``jq.needs_calibration``) run once and stand for every draw. The table gives mean ± std over the draws; the
comparisons (SKVQ vs KIVI with the same exact tokens, with and without the window; WKVQuant vs RTN at equal bits) are
paired per draw, mean ± standard error, and count beyond two standard errors (perplexity, else KL:
``harness.paired_lead`` / ``decide``).

Every number uses the quantized cache as decoding does:

- perplexity: a full-sequence pass whose attention reads each earlier token as a token-by-token decode
  with that cache would (sink/window tokens exact, the rest dequantized; ``ops.attention_quantized_past``,
  equal to real decoding: tests/kv/test_windowed_kv_cache.py), on validation windows; one window is
  also decoded token by token through the real cache and reported beside it;
- KL to the FP16-cache model's next-token distribution and top-1 agreement with it
  (``jquant.eval.distribution_agreement``): the same pass against the float model, on the same windows;
- retrieval: needle prompts at the model's full context (``--retrieval passage``: a passage to continue;
  ``recall``: an associative-recall block, ``jquant.data.recall``, for a model trained on such rows), the haystack
  prefilled in chunks into the cache and the question decoded token by token reading it (``jquant.eval.retrieval``);
- memory: the bytes of the cache's arrays (codes, scales, zero points, sink, window) for one sequence,
  from ``jax.eval_shape`` of ``init_cache``, for this model and for a Llama-2-7B-shaped one.
"""

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from harness import Column, Results
from jquant.models.loading import load

from jquant import needs_calibration, quantize
from jquant.data import load_split, random_windows
from jquant.data.needle import make_passage_example
from jquant.data.recall import make_recall_example, recall_alphabet
from jquant.data.windows import token_stream, token_windows
from jquant.eval.agreement import distribution_agreement
from jquant.eval.perplexity import perplexity
from jquant.eval.retrieval import needle_retrieval
from jquant.kv import KVCacheConfig, KVQuantizer, init_cache
from jquant.kv.baselines import kivi, rtn
from jquant.kv.calibrate import set_kv_cache
from jquant.kv.skvq import SKVQConfig, skvq
from jquant.kv.wkvquant import WKVQuantConfig
from jquant.methods.wkvquant import wkvquant
from jquant.recipes import get as get_recipe

SETTINGS = {"K4V4": (4, 4), "K2V2": (2, 2), "K2V1.5": (2, 1.5)}
LOW = ("K2V2", "K2V1.5")  # SKVQ's claim (ahead of KIVI) is about these
GROUP = 32  # channels per token group (SKVQ: average cluster size; KIVI: also tokens per key block)
SINK, WINDOW = SKVQConfig().sink, SKVQConfig().window  # SKVQ's exact tokens (5 sink, 128 recent)
RTN_W4 = "rtn-w4g128"
FP = "FP16 cache"
RTN_HEAD = "RTN head groups"
KIVI_SINK = f"KIVI sink{SINK}"
KIVI_WINDOW = f"KIVI sink{SINK} window{WINDOW}"
SKVQ_NO_WINDOW = "SKVQ window0"
W4 = "RTN W4 (g128), FP16 cache"
W4_RTN = "RTN W4 (g128) + RTN KV4"
W4_RTN_HEAD = "RTN W4 (g128) + RTN KV4 head groups"
W4_WKV = "WKVQuant W4KV4"
ABLATION = ("ablation K2V2: + past-only", "ablation K2V2: + smoothing (init)")
RECALL_PAIRS, RECALL_VALUE_LEN = 16, 2  # ``--retrieval recall``: pairs per block, tokens per value
RETRIEVAL_FLOOR = 0.5  # below this FP16 exact accuracy the retrieval column ranks nothing
NAMES = [FP, *(f"{m} {s}" for s in SETTINGS
               for m in ("RTN", RTN_HEAD, "KIVI", KIVI_SINK, KIVI_WINDOW, "SKVQ", SKVQ_NO_WINDOW, "WKVQuant")),
         W4, W4_RTN, W4_RTN_HEAD, W4_WKV, *ABLATION]
ABLATION_STEPS = [f"{RTN_HEAD} K2V2", *ABLATION, "WKVQuant K2V2"]
# (comparison, setting, ours, baseline): SKVQ vs KIVI with the same exact tokens, WKVQuant vs RTN at equal bits
COMPARISONS = [
    *((f"SKVQ − KIVI, both with sink {SINK} + window {WINDOW}", s, f"SKVQ {s}", f"{KIVI_WINDOW} {s}")
      for s in SETTINGS),
    *((f"SKVQ − KIVI, both with sink {SINK} and no window", s, f"{SKVQ_NO_WINDOW} {s}", f"{KIVI_SINK} {s}")
      for s in SETTINGS),
    *(("WKVQuant − RTN at equal bits (one fp16-scaled group per head)", s, f"WKVQuant {s}", f"{RTN_HEAD} {s}")
      for s in SETTINGS),
    ("WKVQuant − RTN at equal bits (one fp16-scaled group per head)", "W4KV4", W4_WKV, W4_RTN_HEAD)]
VALUES = ("ppl", "kl", "top1", "retrieval", "retrieval_tokens", "bits_per_element", "calibration_seconds",
          "eval_seconds")  # what may vary with the calibration draw
PAPER = [
    ("SKVQ", "needle-in-a-haystack, Llama-2-7B-80K, 32k ctx, K2V1.5", "FP16 268.5, KIVI 235.1, SKVQ 272.2"),
    ("SKVQ", "LongBench GovReport+MultiFieldQA-zh, Mistral-7B-Instr, ~2 avg bits", "FP16 ~37, KIVI ~29.8, SKVQ ~35.2"),
    ("SKVQ", "same, ~1.75 avg bits", "KIVI ~25.3, SKVQ ~32.5"),
    ("WKVQuant", "LLaMA-2-13B decode memory", "~27 GB (FP16) -> ~7 GB (W4KV4)"),
    ("WKVQuant", "accuracy", "W4KV4 'approaching' W4-only; W4A4 collapses (no table available)"),
]


def _cache_mb(model, config: KVCacheConfig | None, tokens: int, shape=None) -> float:
    layers, heads, dim = shape or (model.config.num_layers, model.config.num_kv_heads, model.config.head_dim)
    if config is not None and config.key is not None and getattr(config.key, "perm", None) is not None and shape:
        config = _unreordered(config, heads * dim)
    cache = jax.eval_shape(lambda: init_cache(num_layers=layers, batch=1, capacity=tokens, kv_heads=heads,
                                              head_dim=dim, dtype=jnp.bfloat16, configs=config))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache.layers)) / 2**20


def _unreordered(config: KVCacheConfig, channels: int) -> KVCacheConfig:
    """The same method on another model shape: fixed groups of GROUP channels stand in for the calibrated clusters."""
    def fix(q):
        return None if q is None else dataclasses.replace(q, perm=None, group_sizes=None, group_size=GROUP)

    return dataclasses.replace(config, key=fix(config.key), value=fix(config.value))


def _first_config(model) -> KVCacheConfig | None:
    return model.layers[0].self_attn.kv_cache


def evaluate(spec: "Spec", seed: int | None, model, base, args, data, seconds: float) -> dict:
    """One row: perplexity, KL to / top-1 agreement with the FP16-cache model on the same windows, memory and (unless
    ``--skip-retrieval``) retrieval of ``model``."""
    t0 = time.perf_counter()
    windows = data["ppl_windows"]
    ppl = perplexity(model, windows, batch_size=4, progress=False)
    if model is base:  # the reference itself: KL 0 and full agreement by definition
        kl, top1 = 0.0, 1.0
    else:
        agreement = distribution_agreement(model, base, windows, batch_size=4)
        kl, top1 = agreement.kl, agreement.top1
    row = {"name": spec.name, "seed": seed, "calibrates": spec.calibrates, "ppl": ppl.ppl, "ppl_tokens": ppl.n_tokens,
           "kl": kl, "top1": top1, "calibration_seconds": round(seconds, 1)}
    cfg = _first_config(model)
    row["kv"] = getattr(cfg, "name", "float (bf16)")
    for n in (1024, 8192, 32768):
        row[f"cache_mb_{n}"] = _cache_mb(model, cfg, n)
    row["cache_gb_llama2_7b_32k"] = _cache_mb(model, cfg, 32768, (32, 32, 128)) / 1024
    row["bits_per_element"] = 16 * row["cache_mb_32768"] / _cache_mb(model, None, 32768)
    if not args.skip_retrieval:
        r = needle_retrieval(model, data["needles"], batch_size=args.needle_batch)
        row.update(retrieval=r.accuracy, retrieval_tokens=r.digit_accuracy, retrieval_by_depth=r.by_depth,
                   retrieval_n=r.n, retrieval_context=r.context_len, retrieval_task=args.retrieval)
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def decode_check(model, window: np.ndarray) -> float:
    """Perplexity of one window decoded token by token through the real cache (teacher forcing)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(1, tokens.shape[1])

        def body(cache, tok):
            logits, cache = m.step(tok[None, None], cache)
            return cache, jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))

        _, logp = jax.lax.scan(body, cache, tokens[0])
        return logp

    logp = np.asarray(run(state, jnp.asarray(window[None])))
    nll = -np.mean(logp[np.arange(len(window) - 1), window[1:]])
    return float(np.exp(nll))


@dataclasses.dataclass(frozen=True)
class Spec:
    """A row to run: ``build(calib, seed)`` makes its model (``calib``/``seed`` None for a row that does not
    calibrate)."""

    name: str
    calibrates: bool
    build: Callable[[np.ndarray | None, int | None], nnx.Module]


def _setting_specs(args, base, setting: str, kb: float, vb: float) -> list[Spec]:
    head = base.config.head_dim

    def fixed(config: KVCacheConfig) -> Callable:
        return lambda calib, seed: _with(base, config)

    def skvq_row(window: int) -> Callable:
        return lambda calib, seed: skvq(base, calib, SKVQConfig(key_bits=kb, value_bits=vb, group_size=GROUP,
                                                                window=window, sink=SINK, seed=seed))[0]

    kivi_cfg = kivi(kb, vb, group_size=GROUP)
    return [Spec(f"RTN {setting}", False, fixed(rtn(kb, vb, group_size=GROUP))),
            Spec(f"{RTN_HEAD} {setting}", False, fixed(rtn(kb, vb, group_size=head))),
            Spec(f"KIVI {setting}", False, fixed(kivi_cfg)),
            Spec(f"{KIVI_SINK} {setting}", False, fixed(dataclasses.replace(kivi_cfg, sink=SINK))),
            Spec(f"{KIVI_WINDOW} {setting}", False, fixed(dataclasses.replace(kivi_cfg, sink=SINK, window=WINDOW))),
            Spec(f"SKVQ {setting}", True, skvq_row(WINDOW)),
            Spec(f"{SKVQ_NO_WINDOW} {setting}", True, skvq_row(0)),
            Spec(f"WKVQuant {setting}", True, lambda calib, seed: wkvquant(base, calib, WKVQuantConfig(
                weight_bits=None, key_bits=kb, value_bits=vb, epochs=args.wkv_epochs, seed=seed), progress=False)[0])]


def rows(args, base) -> list[Spec]:
    """Every row, in the order of ``NAMES``."""
    w4_calibrates = needs_calibration(base, RTN_W4)
    w4_models: dict[Any, nnx.Module] = {}

    def w4(calib, seed):
        if seed not in w4_models:
            w4_models.clear()
            w4_models[seed] = quantize(base, get_recipe(RTN_W4), calib, progress=False)
        return w4_models[seed]

    head = base.config.head_dim
    specs = [Spec(FP, False, lambda calib, seed: base),
             *(s for setting, (kb, vb) in SETTINGS.items() for s in _setting_specs(args, base, setting, kb, vb)),
             Spec(W4, w4_calibrates, w4),
             Spec(W4_RTN, w4_calibrates, lambda calib, seed: _with(w4(calib, seed), rtn(4, 4, group_size=GROUP))),
             Spec(W4_RTN_HEAD, w4_calibrates, lambda calib, seed: _with(w4(calib, seed), rtn(4, 4, group_size=head))),
             Spec(W4_WKV, True, lambda calib, seed: wkvquant(base, calib, WKVQuantConfig(
                 epochs=args.wkv_epochs, seed=seed), progress=False)[0]),
             # WKVQuant's ingredients at K2V2 after "RTN head groups K2V2" (its layout); CRR is "WKVQuant K2V2"
             Spec(ABLATION[0], False, lambda calib, seed: _with(base, KVCacheConfig(
                 key=KVQuantizer(bits=2, group_size=head), value=KVQuantizer(bits=2, group_size=head),
                 past_only=True))),
             Spec(ABLATION[1], True, lambda calib, seed: wkvquant(base, calib, WKVQuantConfig(
                 weight_bits=None, key_bits=2, value_bits=2, epochs=0, seed=seed), progress=False)[0])]
    assert [s.name for s in specs] == NAMES
    return specs


def _with(model, config):
    out = nnx.clone(model)
    set_kv_cache(out, lambda _path: config)
    return out


def prepare(args, tok):
    val = load_split("validation")
    stream = token_stream(val, tok)
    windows = token_windows(val, tok, args.ppl_len)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(windows), size=min(args.ppl_windows, len(windows)), replace=False)
    if args.retrieval == "recall":
        alphabet = recall_alphabet(len(tok), exclude=tuple(tok.all_special_ids))
        needles = [make_recall_example(stream, alphabet, context_len=args.needle_len, depth=d, rng=rng,
                                       n_pairs=RECALL_PAIRS, value_len=RECALL_VALUE_LEN)
                   for d in args.depths for _ in range(args.needles_per_depth)]
    else:
        source = token_stream(load_split("test"), tok)
        needles = [make_passage_example(stream, source, context_len=args.needle_len, depth=d, rng=rng)
                   for d in args.depths for _ in range(args.needles_per_depth)]
    return {"ppl_windows": windows[np.sort(pick)], "needles": needles}


def _retrieval_text(rs: list[dict]) -> str:
    done = [r for r in rs if "retrieval" in r]
    if not done:
        return "not run"
    r = done[0]
    depths = ", ".join(f"{float(d):g}" for d in sorted(r["retrieval_by_depth"], key=float))
    names = ", ".join(dict.fromkeys(x["name"] for x in done))
    if r.get("retrieval_task") == "recall":
        what = (f"associative recall at {r['retrieval_context']} tokens, {r['retrieval_n']} prompts (depths {depths}): "
                f"a block of {RECALL_PAIRS} one-token keys each followed by a {RECALL_VALUE_LEN}-token value inside a "
                "validation-split haystack, the prompt ends with one of its keys (absent from the haystack), the "
                f"answer is its value (exact: all {RECALL_VALUE_LEN} right / tokens: fraction right)")
    else:
        what = (f"passage recall at {r['retrieval_context']} tokens, {r['retrieval_n']} prompts (depths {depths}): a "
                "20-token test-split passage inside a validation-split haystack, the prompt ends with its first 12 "
                "tokens, the answer is the next 8 (exact: all 8 right / tokens: fraction right)")
    return what + "; measured for " + names + " only (see below)"


def merged(raw: list[dict]) -> dict[str, dict]:
    """One row per name (mean, ``_std`` and ``_runs`` over the calibration draws: ``harness.over_seeds``), in the
    order of ``NAMES`` (names it does not know last)."""
    rs = harness.over_seeds(raw, by=("name",), values=VALUES)
    order = {n: i for i, n in enumerate(NAMES)}
    return {r["name"]: r for r in sorted(rs, key=lambda r: order.get(r["name"], len(order)))}


def _runs(raw: list[dict], name: str, value: str) -> dict[Any, float]:
    """``value`` of row ``name`` by calibration draw (``{None: v}``: a row that does not calibrate, run once)."""
    return {r.get("seed"): r[value] for r in raw if r["name"] == name and r.get(value) is not None}


def _diff(raw: list[dict], ours: str, base: str, value: str) -> tuple[float, float, int] | None:
    """``ours − base`` in ``value``, paired per draw (``harness.paired_difference``)."""
    a, b = _runs(raw, ours, value), _runs(raw, base, value)
    return harness.paired_difference(a, b) if a and b else None


def _decide(raw: list[dict], ours: str, base: str) -> tuple[str, harness.Lead] | None:
    """``harness.decide`` of ``base``'s lead over ``ours``: perplexity beyond 2 SE, else KL (None: rows missing)."""
    leads = [harness.paired_lead(_runs(raw, ours, v), _runs(raw, base, v), v)
             if _runs(raw, ours, v) and _runs(raw, base, v) else None for v in ("ppl", "kl")]
    return harness.decide(*leads)


def _comparison(raw: list[dict], ours: str, base: str) -> str:
    """``ppl d ± se, KL d ± se e-3 → judgement`` of ``ours − base`` (``harness.comparison``)."""
    return harness.comparison(_diff(raw, ours, base, "ppl"), _diff(raw, ours, base, "kl"))


def _present(raw: list[dict]) -> list[tuple[str, str, str, str]]:
    """The ``COMPARISONS`` whose two rows both ran."""
    names = {r["name"] for r in raw}
    return [c for c in COMPARISONS if c[2] in names and c[3] in names]


def comparison_table(raw: list[dict]) -> list[str]:
    """Per setting, each comparison's ``harness.comparison`` (ours − baseline, paired per draw)."""
    present = _present(raw)
    kinds = list(dict.fromkeys(c[0] for c in present))
    settings = list(dict.fromkeys(c[1] for c in present))
    if not present:
        return []
    cell = {(c[0], c[1]): _comparison(raw, c[2], c[3]) for c in present}
    return harness.table([{"setting": s, **{k: cell.get((k, s)) for k in kinds}} for s in settings],
                         [Column("setting", "setting"), *(Column(k, k, missing="–") for k in kinds)])


def _gaps(by: dict[str, dict]) -> tuple[float, float] | None:
    """W4KV4's perplexity above W4 alone: WKVQuant's and equal-bits RTN's (means over the draws)."""
    if not all(n in by for n in (W4, W4_WKV, W4_RTN_HEAD)):
        return None
    return by[W4_WKV]["ppl"] - by[W4]["ppl"], by[W4_RTN_HEAD]["ppl"] - by[W4]["ppl"]


def _verdict(raw: list[dict]) -> str | None:
    """The papers' claims from the paired per-draw comparisons (a difference counts beyond two standard errors, by
    perplexity, else by KL: ``harness.decide``). SKVQ's: ahead of KIVI at K2V2 and K2V1.5, both with SKVQ's sink and
    window and with the sink alone (KIVI given the same exact tokens). WKVQuant's: W4KV4 ahead of RTN W4 + RTN KV4 at
    equal bits, its gap to W4 alone under half of RTN's (the spec's "small fraction"). Every claim that ran holds:
    reproduced; some: partly reproduced; none: not reproduced. Each comparison at every setting is stated, K4V4 and
    the KV-only WKVQuant rows included. None when none of the claims' rows ran."""
    by = merged(raw)
    present = _present(raw)
    skvq_claim = [c for c in present if c[0].startswith("SKVQ") and c[1] in LOW]
    wkv_claim = [c for c in present if c[1] == "W4KV4"]
    gaps = _gaps(by)
    if not skvq_claim and (not wkv_claim or gaps is None):
        return None
    holds, missing = [], []
    if skvq_claim:
        holds.append(all(_decide(raw, c[2], c[3])[0] == "ahead" for c in skvq_claim))
        missing += [f"SKVQ − KIVI {s}" for s in LOW if not any(c[1] == s for c in skvq_claim)]
    else:
        missing.append("SKVQ − KIVI")
    if wkv_claim and gaps is not None:
        holds.append(_decide(raw, W4_WKV, W4_RTN_HEAD)[0] == "ahead" and abs(gaps[0]) < 0.5 * abs(gaps[1]))
    else:
        missing.append("WKVQuant W4KV4")
    category = "reproduced" if all(holds) else "partly reproduced" if any(holds) else "not reproduced"
    draws = max(len(_runs(raw, c[2], "ppl")) for c in present)
    parts = []
    for kind in dict.fromkeys(c[0] for c in present):
        parts.append(f"{kind}: " + ", ".join(f"{c[1]} {_comparison(raw, c[2], c[3])}" for c in present
                                               if c[0] == kind))
    text = (f"{category} (ours − baseline, mean over {draws} calibration draw{'s' * (draws > 1)} ± the standard "
            "error of the paired per-draw difference, rows that do not calibrate run once; a difference counts "
            "beyond two standard errors, by perplexity, else by KL). " + "; ".join(parts) + ".")
    if gaps is not None:
        text += (f" WKVQuant W4KV4 sits {gaps[0]:+.3f} ppl above W4 alone against equal-bits RTN KV4's "
                 f"{gaps[1]:+.3f}: {'' if abs(gaps[0]) < 0.5 * abs(gaps[1]) else 'not '}the small fraction (under "
                 "half) the paper's claim needs.")
    if missing:
        text += f" Not run: {', '.join(missing)}."
    return text


def summary(raw: list[dict], ppl_len: int) -> list[str]:
    """Sentences computed from the rows (nothing here is typed in by hand; means over the calibration draws)."""
    by = merged(raw)
    fp = by.get(FP)
    out = []
    if fp is None:
        return out
    for setting in SETTINGS:
        found = [r for n, r in by.items() if n.endswith(f" {setting}") and not n.startswith("ablation")]
        if not found:
            continue
        ranked = sorted(found, key=lambda r: r["ppl"])
        text = ", ".join(f"{r['name'][:-len(setting) - 1]} {r['ppl'] - fp['ppl']:+.3f} / {1e3 * r['kl']:.2f}e-3 "
                         f"({r['bits_per_element']:.2f} bits)" for r in ranked if r.get("kl") is not None)
        out.append(f"- {setting}, perplexity change / KL vs the FP16 cache, best perplexity first: {text}.")
    window = [(f"{m} {s}", ours, with_window) for s in SETTINGS
              for m, ours, with_window in (("SKVQ", f"{SKVQ_NO_WINDOW} {s}", f"SKVQ {s}"),
                                           ("KIVI", f"{KIVI_SINK} {s}", f"{KIVI_WINDOW} {s}"))
              if ours in by and with_window in by]
    if window:
        text = ", ".join(f"{label} {harness.plus_minus(_diff(raw, ours, with_window, 'ppl'), '+.3f')}"
                         for label, ours, with_window in window)
        out.append(f"- What the {WINDOW}-token exact window adds (perplexity without it − with it, paired per draw): "
                   f"{text}. With the {ppl_len}-token perplexity windows the sink and window hold up to "
                   f"{min(1, (SINK + WINDOW) / ppl_len):.0%} of a window's tokens exact, which is why the methods are "
                   "compared with the same exact tokens.")
    gaps = _gaps(by)
    if gaps is not None:
        w4 = by[W4]
        out.append(f"- Weights at 4 bits: W4 alone {w4['ppl']:.3f}, WKVQuant W4KV4 {by[W4_WKV]['ppl']:.3f} "
                   f"({gaps[0]:+.3f} vs W4), RTN W4 + RTN KV4 head groups {by[W4_RTN_HEAD]['ppl']:.3f} "
                   f"({gaps[1]:+.3f}, the same bits per element)"
                   + (f", with groups of {GROUP} {by[W4_RTN]['ppl']:.3f} ({by[W4_RTN]['ppl'] - w4['ppl']:+.3f}, "
                      f"{by[W4_RTN]['bits_per_element']:.2f} bits)" if W4_RTN in by else "") + ".")
    if all(n in by for n in ABLATION_STEPS):
        text = " -> ".join(f"{n.split(': ')[-1]} {by[n]['ppl']:.3f}" for n in ABLATION_STEPS)
        out.append(f"- WKVQuant ablation at K2V2 (one group per head): {text} (the last step adds CRR training).")
    if "retrieval" in fp:
        text = (f"- Retrieval: the FP16 model itself answers {fp['retrieval']:.2f} of the prompts exactly "
                f"({fp['retrieval_tokens']:.2f} of the tokens)")
        if fp["retrieval"] < RETRIEVAL_FLOOR:
            text += (f", below {RETRIEVAL_FLOOR:.2f}, so the retrieval column cannot rank the KV methods: the model "
                     "never learned to copy from its context (experiments/train_long_context.py).")
        else:
            others = [r for r in by.values() if "retrieval" in r and r is not fp]
            text += "; the others, exact / tokens: " + ", ".join(
                f"{r['name']} {r['retrieval']:.2f} / {r['retrieval_tokens']:.2f}" for r in others) + "."
        out.append(text)
    return out


COLUMNS = [
    Column("method", "name"),
    Column("draws", lambda r: len(r["seeds"]) if r.get("calibrates") else None, missing="once"),
    Column("KV bits/elem (32k)", "bits_per_element", ".2f"),
    Column("perplexity", harness.mean_std("ppl", ".3f")),
    Column("Δ vs FP", "delta", "+.3f", missing=""),
    Column("KL (1e-3 nats)", harness.mean_std("kl", ".2f", 1e3)),
    Column("top-1 %", harness.mean_std("top1", ".2f", 100)),
    Column("retrieval (exact / tokens)", lambda r: f"{r['retrieval']:.2f} / {r['retrieval_tokens']:.2f}"
           if "retrieval" in r else None, missing="-"),
    Column("cache MB at 1k / 8k / 32k",
           lambda r: f"{r['cache_mb_1024']:.2f} / {r['cache_mb_8192']:.1f} / {r['cache_mb_32768']:.1f}"),
    Column("Llama-2-7B shape, 32k, GB", "cache_gb_llama2_7b_32k", ".2f"),
    Column("calib s", "calibration_seconds", ".0f")]


def _reproduce(commands: list[str]) -> str:
    """The Reproduce sentence: the one command, or every command that wrote rows, in order."""
    if len(commands) == 1:
        return harness.reproduce(commands[0])
    return ("Reproduce: in turn (each after the first with `--resume`, which keeps the rows before it) "
            + ", then ".join(f"`{c}`" for c in commands) + ".")


def report(runs: list[Results], base: Path) -> None:
    """Write ``<base>.md``."""
    results = runs[0]
    raw, meta, args = results.rows, results.meta, results.args
    by = merged(raw)
    fp = by.get(FP)
    table = [{**r, "delta": None if fp is None or r is fp else r["ppl"] - fp["ppl"]} for r in by.values()]
    lines = [
        "# KV-cache quantization: RTN, KIVI, SKVQ, WKVQuant",
        "",
        (f"Model: {meta['model']} ({meta['context']}-token context; {meta['kv_channels']} key/value channels "
         f"per token = {meta['kv_heads']} heads x {meta['head_dim']}). {_reproduce(meta['commands'])}"),
        "",
        (f"Settings shared by all methods: token groups of {GROUP} channels (SKVQ: {GROUP} on average, k-means "
         f"clusters over both heads, permuted, fp8 scale/zero; RTN and KIVI: fixed groups, fp16 scale/zero; KIVI keys: "
         f"per channel over blocks of {GROUP} tokens, the incomplete block exact); RTN head groups: one group of "
         f"{meta['head_dim']} channels per head, fp16 scale/zero (WKVQuant's layout and bits); SKVQ: window {WINDOW}, "
         f"sink {SINK}, clip 0.92, keys before RoPE ({SKVQ_NO_WINDOW}: sink {SINK} only, the paper's perplexity "
         f"setting); KIVI sink{SINK} (window{WINDOW}): KIVI with SKVQ's exact sink (and window) tokens; WKVQuant: one "
         f"group per head, fp16 scale/zero, learned smoothing (CRR, depth 1, MAE, {meta['wkv_epochs']} epochs), "
         f"past-only attention, keys after RoPE. Calibration: {meta['calib']}; rows that do not calibrate "
         "(draws: once) run once and stand for every draw."),
        "",
        (f"Perplexity, KL and top-1: {meta['ppl']} — every token is predicted as in token-by-token decoding through "
         "the quantized cache; KL (1e-3 nats per token) from the FP16-cache model's next-token distribution and top-1 "
         "agreement with it on the same windows and positions. Mean ± std over the calibration draws. Retrieval: "
         + _retrieval_text(raw) + "."),
        "",
        *harness.table(table, COLUMNS),
    ]
    if (text := _verdict(raw)) is not None:
        lines += ["", harness.verdict(text)]
    if comparisons := comparison_table(raw):
        lines += ["", ("Comparisons (ours − baseline; mean over the calibration draws ± the standard error of the "
                       "paired per-draw difference; → the judgement at two standard errors, perplexity first, then "
                       "KL):"),
                  "", *comparisons]
    lines += ["", "Cache configurations:", ""]
    lines += [f"- {r['name']}: `{r['kv']}`" for r in by.values()]
    if "decode_check" in meta:
        d = meta["decode_check"]
        draw = "" if d.get("seed") is None else f", draw {d['seed']}"
        lines += ["", (f"Real decoding check ({d['name']}{draw}, one {d['tokens']}-token window): token-by-token "
                       f"decode through the packed cache gives perplexity {d['decoded']:.4f}; the simulated pass gives "
                       f"{d['simulated']:.4f}.")]
    lines += ["", "## The papers' numbers (their models; not comparable in absolute terms)", "",
              "| paper | setting | reported |", "|---|---|---|"]
    lines += [f"| {p} | {s} | {v} |" for p, s, v in PAPER]
    lines += ["", "## What we see", ""] + summary(raw, args["ppl_len"])
    harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(lines) + "\n")


def run(args: argparse.Namespace, results: Results) -> None:
    """Every row not yet in ``results`` (with ``--only``: the named rows, replaced if present): the rows that do not
    calibrate once, the others once per seed."""
    loaded = load(args.model)
    base, tok = loaded.model, loaded.tokenizer
    specs = rows(args, base)
    if args.only is not None and (unknown := [n for n in args.only if n not in NAMES]):
        raise SystemExit(f"--only: no row named {', '.join(map(repr, unknown))}; the rows: "
                         + ", ".join(map(repr, NAMES)))
    data = prepare(args, tok)
    cfg = base.config
    commands = results.meta.get("commands", [])
    results.set_meta(
        model=args.model, context=cfg.max_position_embeddings, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        kv_channels=cfg.num_kv_heads * cfg.head_dim, wkv_epochs=args.wkv_epochs,
        calib=f"{args.calib_windows} random {args.calib_len}-token training-split windows per draw (seeds "
              f"{', '.join(map(str, args.seeds))})",
        ppl=f"{len(data['ppl_windows'])} validation windows of {args.ppl_len} tokens",
        commands=commands + [results.command] * (results.command not in commands))
    for i, seed in enumerate(args.seeds):
        calib = None
        for spec in specs:
            row_seed = seed if spec.calibrates else None
            if (args.only is not None and spec.name not in args.only) or (not spec.calibrates and i > 0) or (
                    args.only is None and results.has(name=spec.name, seed=row_seed)):
                continue
            if spec.calibrates and calib is None:
                calib = random_windows(load_split("train"), tok, args.calib_windows, args.calib_len,
                                       jax.random.key(seed))
            t0 = time.perf_counter()
            model = spec.build(calib if spec.calibrates else None, row_seed)
            results.add(evaluate(spec, row_seed, model, base, args, data, time.perf_counter() - t0))
            print(json.dumps({k: v for k, v in results.rows[-1].items() if k != "retrieval_by_depth"}), flush=True)
            if spec.name == "SKVQ K2V2" and "decode_check" not in results.meta:
                window = data["ppl_windows"][0][:512]
                results.set_meta(decode_check={
                    "name": spec.name, "seed": row_seed, "tokens": len(window),
                    "decoded": decode_check(model, window),
                    "simulated": perplexity(model, window[None], batch_size=1, progress=False).ppl})


VOLATILE = ("only", "skip_retrieval", "depths", "needles_per_depth", "needle_batch", "retrieval")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppl-len", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=24)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows per draw")
    parser.add_argument("--needle-len", type=int, default=4096)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--needles-per-depth", type=int, default=2)
    parser.add_argument("--needle-batch", type=int, default=5)
    parser.add_argument("--wkv-epochs", type=int, default=2)
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--retrieval", choices=("passage", "recall"), default="passage",
                        help="retrieval prompts: a passage to continue, or an associative-recall block (jquant.data."
                             "recall) whose key the prompt ends with (for a model trained on such rows)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to (re)run")
    harness.add_arguments(parser, model="jq-llama-long", seeds=(0, 1, 2))
    return parser


QUICK_ROWS = [FP, *(f"{m} K2V2" for m in ("RTN", RTN_HEAD, "KIVI", KIVI_SINK, KIVI_WINDOW, "SKVQ", SKVQ_NO_WINDOW,
                                           "WKVQuant"))]


def main() -> None:
    harness.run_experiment(_parser(), stem=lambda a: "kvcache", key=("name", "seed"), run=run, report=report,
                           volatile=VOLATILE,
                           quick={"ppl_len": 256, "ppl_windows": 2, "calib_len": 64, "calib_windows": 2,
                                  "wkv_epochs": 1, "seeds": [0, 1], "skip_retrieval": True, "only": QUICK_ROWS})


if __name__ == "__main__":
    main()
