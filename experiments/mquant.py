"""MQuant on Qwen2-VL -> experiments/results/mquant.md (+ .json).

    python experiments/mquant.py --latency-only                 # CPU prefill-linear latency table (no model needed)
    python experiments/mquant.py --model jq-vl-tiny             # + quality rows (needs the trained jq-vl-tiny)
    python experiments/mquant.py --model /tmp/vl --quick --out /tmp   # smoke run on any Qwen2-VL folder

Latency (MQuant Table 10's setting, on CPU): the seven linears of one Qwen2-VL-2B decoder layer (hidden 1536,
intermediate 8960, 12 query / 2 KV heads of 128) on a prefill of ``n`` image tokens + 64 text tokens, int4 per-channel
weights (``int4-full``), int8 activations quantized per token at run time (dynamic) or with calibrated static scales:
one shared scale, one per modality selected per token (MSQ) or per contiguous block after the AIFS reordering (two
scalar-scale segments). jquant's CPU path fake-quantizes (int codes, then a float GEMM), so the table measures the
activation-quantization overhead of each scheme around the same GEMM, not an int8 kernel.

Quality (with ``--model``): W4A8 recipes (``mquant-w4a8``, the single shared static scale baseline, per-token dynamic
``quarot-w4a8-dynamic-vl``, RTN/GPTQ W8A8 dynamic) calibrated on ``--calib`` image prompts and scored on disjoint held-out
ones: KL(float || quantized) and top-1 agreement of the next-token logits at text positions after the image (spec §5);
and the visual-vs-text activation range gap (calibrated static scales, image over text, per decoder linear).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).parent / "results"
WIDTH = dict(hidden=1536, intermediate=8960, q=12 * 128, kv=2 * 128)  # Qwen2-VL-2B's decoder
TEXT_TOKENS = 64


def _layer_weights(key) -> list:
    """The seven linears of one decoder layer as int4 per-channel ``QArray`` kernels ``[in, out]``."""
    from jquant.formats.api import quantize

    d, f = WIDTH["hidden"], WIDTH["intermediate"]
    shapes = [(d, WIDTH["q"]), (d, WIDTH["kv"]), (d, WIDTH["kv"]), (WIDTH["q"], d), (d, f), (d, f), (f, d)]
    keys = jax.random.split(key, len(shapes))
    return [quantize(jax.random.normal(k, s) * 0.02, "int4-full", axis=0) for k, s in zip(keys, shapes)]


def _scheme(name: str, weights, n_image: int):
    """A jitted ``x [1, L, d] -> outputs`` of the layer's linears under activation scheme ``name``."""
    from jquant.formats import get_format
    from jquant.ops import linear

    dynamic, static = get_format("int8"), get_format("int8-tensor")
    length = n_image + TEXT_TOKENS
    # image tokens scattered inside the prompt (MSQ without AIFS): every 4th block of the prompt is text
    modality = jnp.asarray(np.isin(np.arange(length), np.arange(n_image // 2, n_image // 2 + TEXT_TOKENS), invert=True),
                           jnp.int32)[None]
    table = jnp.asarray([0.01, 0.2], jnp.float32)

    def apply(x, w):
        if name == "float":
            return linear(x, w.dequantize() if hasattr(w, "dequantize") else w)
        if name == "dynamic per-token":
            return linear(x, w, activation=dynamic)
        if name == "static shared":
            return linear(x, w, activation=static, activation_scale=table[1])
        if name == "MSQ":
            return linear(x, w, activation=static, activation_scale=table, groups=modality)
        # MSQ + AIFS: image tokens first, two contiguous segments with scalar scales
        return jnp.concatenate([linear(x[:, :n_image], w, activation=static, activation_scale=table[1]),
                                linear(x[:, n_image:], w, activation=static, activation_scale=table[0])], axis=1)

    def layer(x, f_in):
        q, k, v = (apply(x, w) for w in weights[:3])
        o = apply(q, weights[3])
        g, u = apply(x, weights[4]), apply(x, weights[5])
        return o, k, v, apply(f_in, weights[6]), g, u

    return jax.jit(layer)


SCHEMES = ("float", "dynamic per-token", "static shared", "MSQ", "MSQ + AIFS")


def latency(sizes: tuple[int, ...], repeats: int) -> list[dict]:
    weights = _layer_weights(jax.random.key(0))
    rows = []
    for n in sizes:
        x = jax.random.normal(jax.random.key(n), (1, n + TEXT_TOKENS, WIDTH["hidden"]))
        f_in = jax.random.normal(jax.random.key(n + 1), (1, n + TEXT_TOKENS, WIDTH["intermediate"]))
        fns = {name: _scheme(name, weights, n) for name in SCHEMES}
        for fn in fns.values():
            jax.block_until_ready(fn(x, f_in))  # compile
        times = {name: [] for name in SCHEMES}
        for _ in range(repeats):  # interleaved, so load from other processes hits every scheme alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, f_in))
                times[name].append(time.perf_counter() - t0)
        row = {"image tokens": n, **{name: float(np.min(t)) * 1e3 for name, t in times.items()}}
        rows.append(row)
        print(row, flush=True)
    return rows


def _prompts(cfg, n: int, seed: int, image=(32, 32)) -> dict:
    from jquant.testing import qwen2_vl_reference as ref

    prompts = [ref.image_prompt(cfg.vision, [[image]], seed=seed + i) for i in range(n)]
    return {"tokens": np.stack([p["tokens"][0] for p in prompts]),
            "pixel_values": np.stack([p["pixel_values"] for p in prompts]),
            "image_grid_thw": np.stack([p["image_grid_thw"] for p in prompts])}


def quality(model_name: str, n_calib: int, n_eval: int) -> dict:
    """KL / top-1 agreement to float at text positions after the image, per recipe, and the modality range gap."""
    from jquant.methods.mquant import share_static_scales
    from jquant.models import load
    from jquant.quantization import quantize

    model = load(model_name).model
    cfg = model.config
    calib, held = _prompts(cfg, n_calib, 1000), _prompts(cfg, n_eval, 5000)

    def logits(m):
        out = [np.asarray(m(held["tokens"][i:i + 1], held["pixel_values"][i], held["image_grid_thw"][i]), np.float64)
               for i in range(n_eval)]
        return np.concatenate(out)

    after = np.cumsum(held["tokens"] == cfg.image_token_id, axis=1) > 0
    after &= held["tokens"] != cfg.image_token_id
    reference = logits(model)

    def score(m) -> dict:
        q = logits(m)
        p, lq = jax.nn.log_softmax(reference), jax.nn.log_softmax(q)
        kl = np.asarray(jnp.sum(jnp.exp(p) * (p - lq), axis=-1))
        top1 = reference.argmax(-1) == q.argmax(-1)
        return {"KL": float(kl[after].mean()), "top-1": float(top1[after].mean())}

    rows, gap = {}, {}
    for recipe in ("rtn-w8a8", "gptq-w8", "quarot-w4a8-dynamic-vl", "mquant-w4a8", "mquant-w4a8-vit4"):
        qmodel = quantize(model, recipe, calib, batch_size=2, progress=False)
        rows[recipe] = score(qmodel)
        if recipe == "mquant-w4a8":
            for i, layer in enumerate(qmodel.layers):
                for name in ("q_proj", "o_proj"):
                    s = np.asarray(getattr(layer.self_attn, name).activation_scale.get_value())
                    gap[f"layers/{i}/self_attn/{name}"] = float(s[1] / s[0])
                for name in ("gate_proj", "down_proj"):
                    s = np.asarray(getattr(layer.mlp, name).activation_scale.get_value())
                    gap[f"layers/{i}/mlp/{name}"] = float(s[1] / s[0])
            share_static_scales(qmodel)
            rows["mquant-w4a8, one shared static scale"] = score(qmodel)
        print(recipe, rows[recipe], flush=True)
    return {"recipes": rows, "range gap (image / text static scale)": gap}


def _markdown(result: dict, command: str) -> str:
    lines = ["# MQuant on Qwen2-VL", "", f"Command: `{command}`", "",
             f"## Prefill latency of one decoder layer's linears (CPU, ms, best of {result['repeats']} interleaved runs)", "",
             f"Width: hidden {WIDTH['hidden']}, intermediate {WIDTH['intermediate']}, q {WIDTH['q']}, k/v "
             f"{WIDTH['kv']} (Qwen2-VL-2B: 1536 / 8960 / 1536 / 256)." + (" **Smoke run (--quick): not the "
             "realistic width or token counts; rerun without --quick.**" if result.get("quick") else ""), "",
             "jquant's CPU path fake-quantizes activations (int codes) before a float GEMM on dequantized int4 "
             "weights; the columns differ only in how the activation scales are found (per-token reduction vs "
             f"static), measured on the shared 2-core machine. Prompt: n image tokens + {TEXT_TOKENS} text tokens.", ""]
    header = ["image tokens", *SCHEMES]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["latency"]:
        lines.append("| " + " | ".join([str(row["image tokens"])] + [f"{row[s]:.1f}" for s in SCHEMES]) + " |")
    lines += ["", "## Quality (W4A8, held-out image prompts; KL to float and top-1 agreement after the image)", ""]
    if "quality" not in result:
        lines += ["Not measured yet: needs the trained `jq-vl-tiny` (rerun `python experiments/mquant.py --model "
                  "jq-vl-tiny` once it exists; the rows and the visual-vs-text range gap are written here)."]
    else:
        lines += ["| recipe | KL | top-1 |", "|---|---|---|"]
        lines += [f"| {k} | {v['KL']:.4f} | {v['top-1']:.3f} |" for k, v in result["quality"]["recipes"].items()]
        gap = result["quality"]["range gap (image / text static scale)"]
        lines += ["", "Visual-vs-text activation range gap (mquant-w4a8's calibrated scales, image / text):", "",
                  "| site | image / text |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in gap.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="jq-vl-tiny", help="a Qwen2-VL folder or bundled name")
    parser.add_argument("--latency-only", action="store_true", help="skip the quality rows (no model needed)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few prompts")
    parser.add_argument("--out", default=str(RESULTS), help="folder for mquant.md / mquant.json")
    args = parser.parse_args()
    sizes, repeats = ((64,), 1) if args.quick else ((256, 512, 1024), 5)
    if args.quick:
        WIDTH.update(hidden=256, intermediate=512, q=256, kv=64)
    result = {"latency": latency(sizes, repeats), "repeats": repeats, "quick": args.quick}
    if not args.latency_only:
        result["quality"] = quality(args.model, *((2, 2) if args.quick else (32, 64)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/mquant.py " + " ".join(
        a for a in ("--latency-only" if args.latency_only else f"--model {args.model}", "--quick" if args.quick else "")
        if a)
    (out / "mquant.json").write_text(json.dumps(result, indent=1))
    (out / "mquant.md").write_text(_markdown(result, command))
    print(f"wrote {out / 'mquant.md'}")


if __name__ == "__main__":
    main()
