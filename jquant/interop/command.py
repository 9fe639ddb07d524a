"""``jquant export --format compressed-tensors MODEL --out DIR``: a quantized model as a checkpoint others serve."""

from __future__ import annotations

import argparse

from rich.console import Console

EXPORT_FORMATS = ("compressed-tensors",)


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a quantized model as a compressed-tensors checkpoint "
                        "(transformers, vLLM)")
    ex.add_argument("model", help="a quantized jquant checkpoint folder (`jquant quantize --out`)")
    ex.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="checkpoint format to write")
    ex.add_argument("--out", required=True, help="folder to write; must be new or empty unless --overwrite")
    ex.add_argument("--overwrite", action="store_true",
                    help="let --out replace a folder jquant wrote earlier (never anything else)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace, console: Console) -> dict:
    from jquant.atomic import check_output_folder
    from jquant.interop.ct_export import export_compressed_tensors
    from jquant.models import load

    check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    loaded = load(args.model)
    if getattr(loaded.model, "quantization", None) is None:
        raise ValueError(f"{args.model} is a float model; quantize it first (`jquant quantize --model {args.model} "
                         "--recipe ... --out Q`), then export Q.")
    out = export_compressed_tensors(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite)
    result = {"model": str(loaded.path), "format": args.format, "saved_to": str(out),
              "sites": dict(loaded.model.quantization.sites)}
    if not args.json:
        console.print(f"exported {args.model} ({loaded.model.quantization.recipe.name}) as {args.format} to {out}")
    return result
