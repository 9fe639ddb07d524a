"""The ``jquant`` command: list, eval, generate and train, with rich tables and ``--json`` output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
from rich.console import Console
from rich.table import Table

from jquant import cli_fastattn, cli_image, cli_vae, cli_vl
from jquant.compile_cache import COMPILE_CACHE_MIN_SECONDS, use_compile_cache
from jquant.interop import command as export_command

EPILOG = """examples:
  jquant list models
  jquant list recipes
  jquant quantize --model jq-llama-tiny --recipe gptq-w4g64 --out runs/tiny-w4
  jquant eval --model runs/tiny-w4
  jquant quantize --model jq-llama-tiny --recipe quarot-w4a4kv4
  jquant qsur --model jq-llama-tiny --recipe quarot-w4a4kv4
  jquant eval --model jq-llama-tiny
  jquant eval --model path/to/hf_checkpoint --tasks ppl --max-windows 50 --json
  jquant generate --model jq-llama-tiny --prompt "To be, or not to be" --max-new-tokens 40
  jquant generate --model jq-vl-tiny --image scene.png --prompt "what is just left of the red apple?"
  jquant eval --model jq-vl-tiny --n-items 900 --text-only
  jquant train --preset jq-llama-tiny --steps 800 --out runs/tiny --export runs/tiny/hf
  jquant generate --model jq-mmdit-tiny --prompt "a red apple" --steps 20 --seed 0 --out apple.png
  jquant generate --model jq-mmdit-tiny --prompt "a dog face" --num-images 8 --out dogs.png
  jquant generate --model jq-video-tiny --prompt "a rocket flies up" --frames 33 --dynamic-frame-rate --keep-ratio 0.7 --out rocket.gif
  jquant quantize --model jq-mmdit-tiny --recipe gptq-w4a16 --out runs/mmdit-w4
  jquant eval --model runs/mmdit-w4
"""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (argparse names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _byte_size(text: str) -> int:
    """argparse type: a positive number of bytes, optionally with a binary unit K, M or G ("512M", "1.5G")."""
    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = body[-1] if body and body[-1] in "KMG" else ""
    try:
        value = float(body[:len(body) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}") from None
    size = int(value * _SIZE_UNITS[unit]) if math.isfinite(value) else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 512M or 2G, got {text!r}")
    return size


TOKENIZER_HELP = ("tokenizer folder (with tokenizer.json) for a model folder that ships none "
                  "(default: the model folder's own tokenizer)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jquant",
        description="jquant: make generative models cheap to run, in JAX. Every command prints a table; add --json for machine-readable output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--compile-cache", type=Path, default=None, metavar="FOLDER",
                   help="keep XLA's compiled programs in FOLDER (created if missing) and reuse them in later runs: "
                        "a second `jquant quantize` of the same model compiles little (JAX's persistent cache, "
                        f"programs that took at least {COMPILE_CACHE_MIN_SECONDS} s to compile)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="list bundled models, model presets, recipes or formats")
    ls.add_argument("what", nargs="?", default="models", choices=["models", "presets", "recipes", "formats"])
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ev = sub.add_parser("eval", help="perplexity, zero-shot accuracy, size and latency of a model")
    ev.add_argument("--model", default="jq-llama-tiny",
                    help="bundled model name, Hugging Face folder or `jquant quantize --out` folder (default: %(default)s)")
    _add_eval_options(ev)

    qz = sub.add_parser("quantize", help="quantize a model with a recipe and compare it with the float model")
    qz.add_argument("--model", default="jq-llama-tiny", help="bundled model name or Hugging Face folder (default: %(default)s)")
    qz.add_argument("--recipe", required=True, help="a built-in recipe (`jquant list recipes`) or a .json/.yaml recipe file")
    qz.add_argument("--out", default=None, help="save the quantized model here (orbax + recipe; load with `--model OUT`); "
                                                "must be a new or empty folder unless --overwrite")
    qz.add_argument("--overwrite", action="store_true",
                    help="let --out replace a folder jquant wrote earlier (never anything else)")
    qz.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration windows from the train split (default: %(default)s)")
    qz.add_argument("--calib-seq-len", type=_positive_int, default=256, help="calibration window length (default: %(default)s)")
    qz.add_argument("--seed", type=int, default=0, help="PRNG seed for picking calibration windows")
    qz.add_argument("--calib-source", choices=["corpus", "ebss"], default="corpus",
                    help="calibration text: windows of the bundled corpus, or (MoE models) text the model writes "
                         "itself with MoEQuant's expert-balanced self-sampling (default: %(default)s)")
    qz.add_argument("--capture-budget", type=_byte_size, default=None,
                    help="bound on the calibration statistics one capture pass holds, e.g. 512M (default: 2G); "
                         "lower it to cut peak memory on wide models (same statistics, more passes)")
    qz.add_argument("--no-eval", action="store_true", help="only quantize (and save); skip the comparison table")
    _add_eval_options(qz)

    qs = sub.add_parser("qsur", help="per-layer QSUR of the activations entering each linear, before and after a "
                        "recipe's equivalence transforms")
    qs.add_argument("--model", default="jq-llama-tiny", help="bundled model name or Hugging Face folder (default: %(default)s)")
    qs.add_argument("--recipe", required=True, help="a recipe with transform steps, e.g. quarot-w4a4kv4")
    qs.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration windows from the train split (default: %(default)s)")
    qs.add_argument("--calib-seq-len", type=_positive_int, default=256,
                    help="calibration window length (default: %(default)s)")
    qs.add_argument("--seed", type=int, default=0, help="PRNG seed for picking calibration windows")
    qs.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    qs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    gen = sub.add_parser("generate", help="continue a prompt (language models) or draw it (text-to-image models)")
    gen.add_argument("--model", default="jq-llama-tiny", help="bundled model name or checkpoint folder (default: %(default)s)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=60,
                     help="tokens to generate; prompt + these must fit the model's context (default: %(default)s)")
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0,
                     help="sampling temperature, 0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=_positive_int, default=None,
                     help="sample only from the K most likely tokens, at most the vocabulary size (default: all)")
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default: %(default)s)")
    gen.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")
    cli_image.add_image_generate_options(gen, _positive_int)
    cli_vl.add_generate_options(gen)
    from jquant import cli_video

    cli_video.add_frame_rate_options(gen)

    tr = sub.add_parser("train", help="train a reference-model preset on the bundled corpus")
    tr.add_argument("--preset", default="jq-llama-tiny", help="a preset from `jquant list presets` (default: %(default)s)")
    tr.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps of batch-size x seq-len tokens")
    tr.add_argument("--batch-size", type=_positive_int, default=16)
    tr.add_argument("--seq-len", type=_positive_int, default=256)
    tr.add_argument("--peak-lr", type=float, default=2e-3)
    tr.add_argument("--warmup-steps", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="work folder: checkpoints (resumed if present), history, loss curve")
    tr.add_argument("--export", default=None, help="write the trained model here as a Hugging Face folder "
                                                   "(a new or empty folder unless --overwrite)")
    tr.add_argument("--overwrite", action="store_true",
                    help="let --export replace a folder jquant wrote earlier (never anything else)")
    tr.add_argument("--json", action="store_true")

    cli_fastattn.add_parser(sub, _positive_int)
    cli_vae.add_parsers(sub, _positive_int)
    export_command.add_parser(sub)

    bn = sub.add_parser("bench", help="time the quantized matmul paths against bf16 jnp.dot (run on a GPU)")
    bn.add_argument("--cases", default=None, help="comma-separated case names (default: all; see jquant.benchmark.CASES)")
    bn.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x8192", help="KxN list (default: %(default)s)")
    bn.add_argument("--m", default="1,2,4,8,16,64,256,1024,4096,8192", help="batch sizes M (default: %(default)s)")
    bn.add_argument("--reps", type=_positive_int, default=5)
    bn.add_argument("--no-xla", action="store_true", help="skip the XLA dequantize path")
    bn.add_argument("--out", default=None, help="also write the JSON result and markdown report to this folder")
    bn.add_argument("--allow-cpu", action="store_true", help="run without a GPU (interpret mode; tiny shapes only)")
    bn.add_argument("--json", action="store_true")
    return p


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="ppl,next_line,same_source",
                   help="comma-separated: ppl and zero-shot tasks next_line, source, same_source (default: %(default)s)")
    p.add_argument("--split", default="validation", help="corpus split for perplexity (zero-shot uses test) (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="perplexity window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate only the first N windows (default: all)")
    p.add_argument("--n-items", type=_positive_int, default=200, help="items per zero-shot task (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--no-latency", action="store_true", help="skip the prefill/decode latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    image = p.add_argument_group("text-to-image and text-to-video models")
    image.add_argument("--reference", default=None, help="float pipeline the images or clips are compared with "
                                                         "(PSNR/SSIM; default: the bundled jq-mmdit-tiny or "
                                                         "jq-video-tiny)")
    image.add_argument("--clips", type=_positive_int, default=16,
                       help="text-to-video: single-emoji validation captions to sample (default: %(default)s)")
    image.add_argument("--seeds-per-prompt", type=_positive_int, default=2,
                       help="images per single-glyph prompt (default: %(default)s)")
    image.add_argument("--steps", type=_positive_int, default=None, help="Euler steps (default: the pipeline's)")
    image.add_argument("--guidance", type=float, default=None,
                       help="guidance scale (default: the pipeline's; 0 turns guidance off)")
    cli_image.add_image_eval_options(image)
    cli_vl.add_eval_options(p.add_argument_group("vision-language models (--n-items: VQA test questions)"))


def _print_table(console: Console, title: str, rows: Sequence[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _named_table(title: str, names: Sequence[str], columns: Sequence[str]) -> Table:
    """A table whose first column holds ``names`` in full (never wrapped or cut; the other columns fold instead)."""
    table = Table(title=title)
    table.add_column("name", no_wrap=True, min_width=max(map(len, names), default=4))
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _folder_kind(path) -> str:
    """What a bundled folder holds when its reference_info.json does not say: a config's model_type / class."""
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return data.get("model_type") or data.get("_class_name") or "?"
    return "pipeline" if (path / "pipeline.json").is_file() else "?"


def _validation(info: dict) -> str:
    """The headline validation number a bundled model's reference_info.json records, named."""
    for key, label, fmt in (("validation_ppl", "ppl", ".2f"), ("prompt_accuracy", "prompt acc.", ".3f"),
                            ("validation_psnr_db", "PSNR dB", ".1f"), ("test_accuracy", "accuracy", ".4f")):
        if key in info:
            return f"{label} {info[key]:{fmt}}"
    return "–"


def _cmd_list(args, console: Console) -> dict:
    from jquant.formats import FORMATS
    from jquant.models import list_models
    from jquant.recipes import list_recipes

    if args.what == "recipes":
        data = {r.name: r.to_dict() for r in list_recipes()}
        if not args.json:
            table = _named_table("built-in recipes (embeddings and lm_head stay float)", list(data),
                                 ("transforms", "weights", "activations", "KV / SSM state", "algorithm",
                                  "description"))
            for r in list_recipes():
                rule = r.rules[0]
                state = r.kv_cache or (f"ssm {r.ssm_matmul}" if r.ssm_matmul else "-")
                table.add_row(r.name, ",".join(t.kind for t in r.transforms) or "-", rule.weight or "-",
                              rule.activation or "-", state, rule.algorithm, r.description)
            console.print(table)
        return data
    if args.what == "formats":
        data = {name: str(factory()) for name, factory in FORMATS.items()}
        if not args.json:
            console.print("formats: " + ", ".join(FORMATS))
        return data

    if args.what == "presets":
        from jquant.models.registry import families

        presets = [(name, family.name, cfg) for family in families() for name, cfg in family.presets.items()]
        data = {name: {"family": family, **dataclasses.asdict(cfg)} for name, family, cfg in presets}
        if not args.json:
            sizes = {"hidden": "hidden_size", "layers": "num_layers", "inner/ffn": "intermediate_size",
                     "vocab": "vocab_size", "channels": "block_out_channels", "latent": "latent_channels"}
            table = _named_table("model presets", list(data), ("family", *sizes))
            for name, family, cfg in presets:  # a family's configs name only some sizes ("-" for the others)
                table.add_row(name, family, *(str(getattr(cfg, field, "-")) for field in sizes.values()))
            console.print(table)
        return data
    models = list_models()
    data = {m.name: {"path": str(m.path), **m.info} for m in models}
    if not args.json:
        table = _named_table("bundled models", list(data),
                             ("family", "parameters", "validation", "train tokens", "train time", "weights"))
        for m in models:
            i = m.info
            table.add_row(m.name, i.get("family") or _folder_kind(m.path),
                          f"{i['parameters'] / 1e6:.2f}M" if "parameters" in i else "–", _validation(i),
                          f"{i['train_tokens'] / 1e6:.1f}M" if "train_tokens" in i else "–",
                          f"{i.get('train_seconds', 0) / 60:.1f} min", i.get("weights_dtype", "float32"))
        console.print(table)
    return data


def _tasks(args) -> list[str]:
    """The ``--tasks`` list; an empty one is refused (it would evaluate nothing and look like success)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r} names no task; pass e.g. --tasks ppl,next_line,same_source.")
    return tasks


def _tokenizer(loaded, args, *, required: bool = True):
    """``--tokenizer`` when given, else the model folder's own; a folder without one is an error when ``required``
    (never a silent fallback to the bundled tokenizer) and None otherwise."""
    from jquant.data import load_tokenizer
    from jquant.data.tokenizer import DEFAULT_TOKENIZER_DIR

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if loaded.tokenizer is None and required:
        raise FileNotFoundError(f"{loaded.path} has no tokenizer files (tokenizer.json); pass --tokenizer PATH, "
                                f"e.g. --tokenizer {DEFAULT_TOKENIZER_DIR} for jquant's bundled tokenizer.")
    return loaded.tokenizer


def _check_fits_context(model, length: int, flag: str) -> None:
    """Refuse ``length``-token windows beyond the model's context (RoPE models give numbers, but wrong ones)."""
    from jquant.generate import max_context

    context = max_context(model)
    if context is not None and length > context:
        raise ValueError(f"{flag} {length} exceeds the model's context of {context} tokens; pass {flag} {context} "
                         "or less.")


def _evaluate(model, tokenizer, args, progress: bool) -> dict:
    """Size, perplexity, zero-shot accuracy and latency of ``model`` as selected by ``args``."""
    from jquant.data import load_split, token_windows
    from jquant.eval import perplexity, zero_shot
    from jquant.eval.size import size_report
    from jquant.eval.speed import prefill_decode_latency

    tasks = _tasks(args)
    size = size_report(model)
    result: dict = {"parameters": size.parameters, "parameter_bytes": size.bytes, "bits_per_parameter": size.bits_per_parameter}
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
    return result


def _agreement(model, reference, tokenizer, args, progress: bool) -> dict:
    """KL divergence from ``reference``'s next-token distribution and top-1 agreement, on perplexity's windows."""
    from jquant.data import load_split, token_windows
    from jquant.eval import distribution_agreement

    windows = token_windows(load_split(args.split), tokenizer, args.seq_len, max_windows=args.max_windows)
    agreement = distribution_agreement(model, reference, windows, batch_size=args.batch_size, progress=progress)
    return {"split": args.split, "kl": agreement.kl, "top1": agreement.top1, "positions": agreement.n_positions}


def _metric_rows(result: dict, args) -> list[tuple[str, object]]:
    rows = [("parameters", f"{result['parameters'] / 1e6:.3f}M"), ("size (MB)", f"{result['parameter_bytes'] / 1e6:.2f}"),
            ("bits per parameter", f"{result['bits_per_parameter']:.2f}")]
    if "perplexity" in result:
        rows.append((f"perplexity ({args.split}, {args.seq_len}-token windows)", f"{result['perplexity']['ppl']:.3f}"))
    for name, r in result.get("zero_shot", {}).items():
        rows.append((f"zero-shot {name} accuracy (n={r['n']})", f"{r['accuracy']:.3f}"))
    for name, ms in result.get("latency_ms", {}).items():
        rows.append((f"latency {name} (ms, median)", f"{ms:.2f}"))
    return rows


def _pipeline_command(name: str, args, console: Console) -> dict:
    """``cli_image.<name>`` or ``cli_video.<name>`` by the kind of pipeline ``--model`` names."""
    from jquant import cli_video

    module = cli_video if cli_image.pipeline_kind(args.model) == "text-to-video" else cli_image
    return getattr(module, name)(args, console)


def _cmd_eval(args, console: Console) -> dict:
    from jquant.models import load

    if cli_image.is_pipeline_model(args.model):
        return _pipeline_command("evaluate", args, console)
    if cli_vl.is_vl_model(args.model):
        return cli_vl.evaluate(args, console)

    _tasks(args)
    loaded = load(args.model)
    tokenizer = _tokenizer(loaded, args)
    _check_fits_context(loaded.model, args.seq_len, "--seq-len")
    result = {"model": str(loaded.path), **_evaluate(loaded.model, tokenizer, args, not args.json)}
    if not args.json:
        _print_table(console, f"eval: {args.model}", _metric_rows(result, args))
    return result


def _cmd_quantize(args, console: Console) -> dict:
    from jquant.atomic import check_output_folder
    from jquant.checkpoint import save
    from jquant.data import load_split, random_windows
    from jquant.models import load
    from jquant.quantization import quantize
    from jquant.recipes import Recipe, get

    if cli_image.is_pipeline_model(args.model):
        return _pipeline_command("quantize", args, console)
    if cli_vl.is_vl_model(args.model):
        return cli_vl.quantize(args, console)
    if args.out:
        check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    if not args.no_eval:
        _tasks(args)
    recipe = Recipe.from_file(args.recipe) if args.recipe.endswith((".json", ".yaml", ".yml")) else get(args.recipe)
    loaded = load(args.model)
    tokenizer = _tokenizer(loaded, args, required=args.calib_source == "corpus" or not args.no_eval)
    _check_fits_context(loaded.model, args.calib_seq_len, "--calib-seq-len")
    if not args.no_eval:
        _check_fits_context(loaded.model, args.seq_len, "--seq-len")
    progress = not args.json
    if args.calib_source == "ebss":
        from jquant.calib.ebss import EBSSConfig, self_sample

        config = EBSSConfig(num_sequences=args.calib_samples, length=args.calib_seq_len)
        calib = self_sample(loaded.model, config=config, key=jax.random.key(args.seed), progress=progress).tokens
    else:
        calib = random_windows(load_split("train"), tokenizer, args.calib_samples, args.calib_seq_len,
                               jax.random.key(args.seed))
    qmodel = quantize(loaded.model, recipe, calib, batch_size=args.batch_size, progress=progress,
                      capture_budget=args.capture_budget)
    report = qmodel.quantization
    result = {"model": str(loaded.path), "recipe": recipe.to_dict(), "quantize_seconds": report.seconds,
              "sites": dict(report.sites), "unquantized": list(report.unquantized)}
    if args.out:
        result["saved_to"] = str(save(qmodel, args.out, tokenizer=tokenizer, overwrite=args.overwrite))
    if not args.no_eval:
        result["float"] = _evaluate(loaded.model, tokenizer, args, progress)
        result["quantized"] = _evaluate(qmodel, tokenizer, args, progress)
        if "ppl" in _tasks(args):
            result["agreement"] = _agreement(qmodel, loaded.model, tokenizer, args, progress)
    if not args.json:
        if args.no_eval:
            _print_table(console, f"quantize: {args.model} with {recipe.name}", [("time (s)", f"{report.seconds:.1f}")])
        else:
            table = Table(title=f"{args.model}: float vs {recipe.name}")
            for col in ("metric", "float", recipe.name):
                table.add_column(col, justify="right" if col != "metric" else "left")
            for (name, fp), (_, q) in zip(_metric_rows(result["float"], args), _metric_rows(result["quantized"], args)):
                table.add_row(name, str(fp), str(q))
            if "agreement" in result:
                table.add_row("KL to float (nats per token, same windows)", "0", f"{result['agreement']['kl']:.4f}")
                table.add_row("top-1 agreement with float", "1", f"{result['agreement']['top1']:.3f}")
            table.add_row("quantization time (s)", "", f"{report.seconds:.1f}")
            console.print(table)
        if args.out:
            console.print(f"saved to {result['saved_to']}")
    return result


def _cmd_qsur(args, console: Console) -> dict:
    from jquant.data import load_split, random_windows
    from jquant.models import load
    from jquant.recipes import Recipe, get
    from jquant.transforms import qsur_report
    from jquant.transforms.pipeline import check_recipe, run_transforms

    recipe = Recipe.from_file(args.recipe) if args.recipe.endswith((".json", ".yaml", ".yml")) else get(args.recipe)
    if not recipe.transforms:
        raise ValueError(f"recipe {recipe.name!r} has no transform steps; pick e.g. smoothquant-w8a8 or quarot-w4a4kv4.")
    loaded = load(args.model)
    check_recipe(loaded.model, recipe)
    tokenizer = _tokenizer(loaded, args)
    _check_fits_context(loaded.model, args.calib_seq_len, "--calib-seq-len")
    calib = random_windows(load_split("train"), tokenizer, args.calib_samples, args.calib_seq_len, jax.random.key(args.seed))
    before = qsur_report(loaded.model, calib)
    transformed, _ = run_transforms(loaded.model, recipe, calib, progress=not args.json)
    after = qsur_report(transformed, calib)
    rows = [{"layer": b["layer"], **{f"{k} before": b[k] for k in b if k != "layer"},
             **{f"{k} after": a[k] for k in a if k != "layer"}} for b, a in zip(before.rows(), after.rows())]
    if not args.json:
        table = Table(title=f"QSUR^(1/d) of {args.model}: float vs after {', '.join(t.kind for t in recipe.transforms)}")
        table.add_column("layer")
        kinds = list(dict.fromkeys(k for row in before.rows() for k in row if k != "layer"))  # MoE layers: no down_proj
        for k in kinds:
            table.add_column(k, justify="right")
        for b, a in zip(before.rows(), after.rows()):
            table.add_row(str(b["layer"]), *(f"{b[k]:.4f} -> {a[k]:.4f}" if k in b else "–" for k in kinds))
        table.add_row("mean", *(f"{before.mean(k):.4f} -> {after.mean(k):.4f}" for k in kinds))
        console.print(table)
    return {"model": args.model, "recipe": recipe.name, "layers": rows, "mean_before": before.mean(),
            "mean_after": after.mean()}


def _cmd_generate(args, console: Console) -> dict:
    import numpy as np

    from jquant.generate import SamplingConfig, generate, max_context
    from jquant.models import load

    if cli_image.is_pipeline_model(args.model):
        return _pipeline_command("generate", args, console)
    if cli_vl.is_vl_model(args.model):
        return cli_vl.generate(args, console)
    if args.image:
        raise ValueError(f"--image applies to vision-language models (e.g. jq-vl-tiny); {args.model} is not one.")
    image_only = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance), ("--out", args.out),
                                           ("--frames", args.frames)) if value is not None] + \
        (["--num-images"] if args.num_images != 1 else [])
    if image_only:
        from jquant.models.loading import resolve

        resolve(args.model)  # a model that does not exist is named as such first
        raise ValueError(f"{', '.join(image_only)} apply to text-to-image and text-to-video models; {args.model} is a "
                         "language model.")

    loaded = load(args.model)
    tokenizer = _tokenizer(loaded, args)
    ids = [tokenizer.eos_token_id] + tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
    if args.top_k is not None and vocab is not None and args.top_k > vocab:
        raise ValueError(f"--top-k {args.top_k} exceeds the model's vocabulary of {vocab} tokens; "
                         f"pass --top-k {vocab} or less (or leave it out to sample from all tokens).")
    context = max_context(loaded.model)
    if context is not None and len(ids) + args.max_new_tokens > context:
        raise ValueError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's context of {context} tokens; pass --max-new-tokens {max(context - len(ids), 0)} "
                         "or less, or a shorter --prompt.")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    out = generate(loaded.model, np.array([ids]), args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed),
                   eos_token_id=None)
    continuation = tokenizer.decode(out[0, len(ids):].tolist())
    if not args.json:
        console.print(f"[bold]{args.prompt}[/bold]{continuation}")
    return {"prompt": args.prompt, "continuation": continuation, "tokens": out[0, len(ids):].tolist()}


def _cmd_train(args, console: Console) -> dict:
    from jquant.atomic import check_output_folder, check_work_folder
    from jquant.train import TrainConfig
    from jquant.train.reference import train_reference
    from jquant.train.trainer import RESUMABLE

    check_work_folder(args.out, argument="--out", resumable=RESUMABLE)
    if args.export:
        check_output_folder(args.export, overwrite=args.overwrite, argument="--export", overwrite_hint="--overwrite")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, peak_lr=args.peak_lr,
                      warmup_steps=min(args.warmup_steps, args.steps - 1), seed=args.seed,
                      checkpoint_every=max(1, min(200, args.steps)), eval_every=max(1, min(200, args.steps)))
    summary = train_reference(args.preset, cfg, args.out, export_to=args.export, overwrite_export=args.overwrite,
                              progress=not args.json)
    if not args.json:
        _print_table(console, f"train: {args.preset}", [
            ("parameters", f"{summary['parameters'] / 1e6:.3f}M"),
            ("train tokens", f"{summary['train_tokens'] / 1e6:.2f}M"),
            ("train time", f"{summary['train_seconds'] / 60:.1f} min"),
            ("final train loss", f"{summary['final_train_loss']:.3f}"),
            ("validation perplexity", f"{summary['validation_ppl']:.2f}"),
        ])
    return summary


def _cmd_bench(args, console: Console) -> dict:
    from jquant import benchmark
    from jquant.benchmark_report import markdown_report

    if jax.default_backend() != "gpu" and not args.allow_cpu:
        raise ValueError(f"jquant bench measures GPU kernels but the JAX backend is {jax.default_backend()!r}; "
                         f"run it on a GPU machine (or pass --allow-cpu for a tiny interpret-mode smoke run).")
    names = None if args.cases is None else set(args.cases.split(","))
    cases = tuple(c for c in benchmark.CASES if names is None or c.name in names)
    if not cases:
        raise ValueError(f"--cases {args.cases!r} names no case; known: {[c.name for c in benchmark.CASES]}.")
    try:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        ms = tuple(int(v) for v in args.m.split(","))
    except ValueError:
        raise ValueError(f"--shapes must look like 4096x4096,8192x8192 and --m like 1,16,1024; "
                         f"got {args.shapes!r} and {args.m!r}.") from None
    log = (lambda s: None) if args.json else console.print
    result = benchmark.run_benchmark(cases, shapes, ms, None, args.reps, not args.no_xla, log)
    report = markdown_report(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        gpu = result["device"].replace(" ", "_").lower()
        benchmark.write_json(result, os.path.join(args.out, f"kernels_{gpu}.json"))
        with open(os.path.join(args.out, f"kernels_{gpu}.md"), "w") as f:
            f.write(report)
    if not args.json:
        console.print(markdown_report(result, summary_only=True))
    return result


COMMANDS = {"bench": _cmd_bench, "list": _cmd_list, "eval": _cmd_eval, "quantize": _cmd_quantize, "qsur": _cmd_qsur,
            "generate": _cmd_generate, "train": _cmd_train, "fastattn": cli_fastattn.run, "export": export_command.run,
            "encode": cli_vae.run_encode, "decode": cli_vae.run_decode}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if args.compile_cache is not None:
        try:
            use_compile_cache(args.compile_cache)
        except ValueError as err:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] --compile-cache: {err}")
            return 2
    try:
        result = COMMANDS[args.command](args, console)
    except (ValueError, FileNotFoundError) as err:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {err}")
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
