"""The ``jquant`` command: list, eval, generate and train, with rich tables and ``--json`` output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

EPILOG = """examples:
  jquant list models
  jquant eval --model jq-llama-tiny
  jquant eval --model path/to/hf_checkpoint --tasks ppl --max-windows 50 --json
  jquant generate --model jq-llama-tiny --prompt "To be, or not to be" --max-new-tokens 40
  jquant train --preset jq-llama-tiny --steps 800 --out runs/tiny --export runs/tiny/hf
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jquant",
        description="jquant: make generative models cheap to run, in JAX. Every command prints a table; add --json for machine-readable output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="list bundled models or model presets")
    ls.add_argument("what", nargs="?", default="models", choices=["models", "presets"])
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ev = sub.add_parser("eval", help="perplexity, zero-shot accuracy, size and latency of a model")
    ev.add_argument("--model", default="jq-llama-tiny", help="bundled model name or Hugging Face checkpoint folder (default: %(default)s)")
    ev.add_argument("--tasks", default="ppl,next_line,same_source",
                    help="comma-separated: ppl and zero-shot tasks next_line, source, same_source (default: %(default)s)")
    ev.add_argument("--split", default="validation", help="corpus split for perplexity (zero-shot uses test) (default: %(default)s)")
    ev.add_argument("--seq-len", type=int, default=256, help="perplexity window length in tokens (default: %(default)s)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    ev.add_argument("--n-items", type=int, default=200, help="items per zero-shot task (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--no-latency", action="store_true", help="skip the prefill/decode latency measurement")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")

    gen = sub.add_parser("generate", help="continue a prompt")
    gen.add_argument("--model", default="jq-llama-tiny", help="bundled model name or checkpoint folder (default: %(default)s)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    gen.add_argument("--json", action="store_true")

    tr = sub.add_parser("train", help="train a reference-model preset on the bundled corpus")
    tr.add_argument("--preset", default="jq-llama-tiny", help="a preset from `jquant list presets` (default: %(default)s)")
    tr.add_argument("--steps", type=int, required=True, help="optimizer steps of batch-size x seq-len tokens")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--peak-lr", type=float, default=2e-3)
    tr.add_argument("--warmup-steps", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="work folder: checkpoints (resumed if present), history, loss curve")
    tr.add_argument("--export", default=None, help="write the trained model here as a Hugging Face folder")
    tr.add_argument("--json", action="store_true")
    return p


def _print_table(console: Console, title: str, rows: Sequence[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _cmd_list(args, console: Console) -> dict:
    from jquant.models import list_models, llama

    if args.what == "presets":
        data = {name: dataclasses.asdict(cfg) for name, cfg in llama.PRESETS.items()}
        if not args.json:
            table = Table(title="model presets")
            for col in ("name", "hidden", "layers", "heads/kv", "ffn", "vocab"):
                table.add_column(col)
            for name, cfg in llama.PRESETS.items():
                table.add_row(name, str(cfg.hidden_size), str(cfg.num_layers), f"{cfg.num_heads}/{cfg.num_kv_heads}",
                              str(cfg.intermediate_size), str(cfg.vocab_size))
            console.print(table)
        return data
    models = list_models()
    data = {m.name: {"path": str(m.path), **m.info} for m in models}
    if not args.json:
        table = Table(title="bundled models")
        for col in ("name", "parameters", "validation ppl", "train tokens", "train time", "weights"):
            table.add_column(col)
        for m in models:
            i = m.info
            table.add_row(m.name, f"{i.get('parameters', 0) / 1e6:.2f}M", f"{i.get('validation_ppl', float('nan')):.2f}",
                          f"{i.get('train_tokens', 0) / 1e6:.1f}M", f"{i.get('train_seconds', 0) / 60:.1f} min",
                          i.get("weights_dtype", "?"))
        console.print(table)
    return data


def _cmd_eval(args, console: Console) -> dict:
    from jquant.data import load_split, load_tokenizer, token_windows
    from jquant.eval import param_bytes, param_count, perplexity, zero_shot
    from jquant.eval.speed import prefill_decode_latency
    from jquant.models import load

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    loaded = load(args.model)
    tokenizer = loaded.tokenizer or load_tokenizer()
    model = loaded.model
    from flax import nnx

    params = nnx.state(model, nnx.Param)
    result: dict = {"model": str(loaded.path), "parameters": param_count(params), "parameter_bytes": param_bytes(params)}
    progress = not args.json
    if "ppl" in tasks:
        windows = token_windows(load_split(args.split), tokenizer, args.seq_len, max_windows=args.max_windows)
        t0 = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=args.batch_size, progress=progress)
        result["perplexity"] = {"split": args.split, "ppl": ppl.ppl, "tokens": ppl.n_tokens, "seconds": time.perf_counter() - t0}
    zs_tasks = [t for t in tasks if t != "ppl"]
    if zs_tasks:
        zs = zero_shot(model, tokenizer, zs_tasks, n_items=args.n_items, batch_size=args.batch_size, progress=progress)
        result["zero_shot"] = {name: dataclasses.asdict(r) for name, r in zs.items()}
    if not args.no_latency:
        lat = prefill_decode_latency(model)
        result["latency_ms"] = {k: v.median_ms for k, v in lat.items()}
    if not args.json:
        rows = [("parameters", f"{result['parameters'] / 1e6:.3f}M"), ("parameter memory", f"{result['parameter_bytes'] / 2**20:.2f} MiB")]
        if "perplexity" in result:
            rows.append((f"perplexity ({args.split}, {args.seq_len}-token windows)", f"{result['perplexity']['ppl']:.3f}"))
        for name, r in result.get("zero_shot", {}).items():
            rows.append((f"zero-shot {name} accuracy (n={r['n']})", f"{r['accuracy']:.3f}"))
        for name, ms in result.get("latency_ms", {}).items():
            rows.append((f"latency {name} (ms, median)", f"{ms:.2f}"))
        _print_table(console, f"eval: {args.model}", rows)
    return result


def _cmd_generate(args, console: Console) -> dict:
    import jax
    import numpy as np

    from jquant.data import load_tokenizer
    from jquant.generate import SamplingConfig, generate
    from jquant.models import load

    loaded = load(args.model)
    tokenizer = loaded.tokenizer or load_tokenizer()
    ids = [tokenizer.eos_token_id] + tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    out = generate(loaded.model, np.array([ids]), args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed),
                   eos_token_id=None)
    continuation = tokenizer.decode(out[0, len(ids):].tolist())
    if not args.json:
        console.print(f"[bold]{args.prompt}[/bold]{continuation}")
    return {"prompt": args.prompt, "continuation": continuation, "tokens": out[0, len(ids):].tolist()}


def _cmd_train(args, console: Console) -> dict:
    from jquant.train import TrainConfig
    from jquant.train.reference import train_reference

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, peak_lr=args.peak_lr,
                      warmup_steps=min(args.warmup_steps, args.steps - 1), seed=args.seed,
                      checkpoint_every=max(1, min(200, args.steps)), eval_every=max(1, min(200, args.steps)))
    summary = train_reference(args.preset, cfg, args.out, export_to=args.export, progress=not args.json)
    if not args.json:
        _print_table(console, f"train: {args.preset}", [
            ("parameters", f"{summary['parameters'] / 1e6:.3f}M"),
            ("train tokens", f"{summary['train_tokens'] / 1e6:.2f}M"),
            ("train time", f"{summary['train_seconds'] / 60:.1f} min"),
            ("final train loss", f"{summary['final_train_loss']:.3f}"),
            ("validation perplexity", f"{summary['validation_ppl']:.2f}"),
        ])
    return summary


COMMANDS = {"list": _cmd_list, "eval": _cmd_eval, "generate": _cmd_generate, "train": _cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        result = COMMANDS[args.command](args, console)
    except (ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
