"""The ``jquant`` commands on vision-language models (Qwen2-VL family, e.g. jq-vl-tiny): ``generate`` and ``eval``.

``jquant.cli`` hands a command here when ``--model`` names a Qwen2-VL folder (``config.json`` model_type, or a
jquant checkpoint's family):

- ``generate --image PNG --prompt TEXT``: a greedy answer (stopping at ``<eos>``). A prompt without
  ``<image>`` is a question put into the training template (``vqa_scenes.format_prompt``: the image first,
  then ``question: ... answer:``; one image); a prompt with ``<image>`` placeholders is used as written, one
  placeholder per ``--image``. Images must be RGB at the size the model was trained on
  (``reference_info.json``'s ``image_size``) and a multiple of the merger's ``patch_size * merge`` pixels;
  ``--resize`` resizes them instead (bilinear);
- ``eval``: greedy exact-match accuracy on ``--n-items`` questions of the VQA set's test split, per question
  kind and overall (``jquant.train.vl.score``); ``--text-only`` adds the same model on the prompts without the
  image, and the trained text-only baseline recorded in ``reference_info.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # config.json model_types; jquant checkpoints name the family qwen2_vl


def is_vl_model(name_or_path: str) -> bool:
    """Whether ``--model`` names a Qwen2-VL model folder (bundled name, Hugging Face or jquant checkpoint)."""
    from jquant.models.loading import resolve

    try:
        path = resolve(name_or_path)
    except ValueError:
        return False
    for name, key in (("config.json", "model_type"), ("jquant.json", "family")):
        file = path / name if path.is_dir() else None
        if file is not None and file.is_file():
            value = json.loads(file.read_text()).get(key)
            return value in VL_FAMILIES
    return False


def add_generate_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vision-language models")
    group.add_argument("--image", action="append", default=None, metavar="PNG",
                       help="an image for the prompt (repeat for several; each fills one <image> of --prompt)")
    group.add_argument("--resize", action="store_true",
                       help="resize images to the model's training size instead of refusing another size")


def add_eval_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--text-only", action="store_true",
                       help="vision-language models: also score the prompts without the image, and show the "
                            "trained text-only baseline recorded with the model")


def _training_info(path: Path) -> dict:
    info = path / "reference_info.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def read_image(file: str, *, size: tuple[int, int] | None) -> np.ndarray:
    """``[H, W, C]`` uint8 of a PNG / JPEG file (palette images as RGB); resized (bilinear) to ``size`` when given."""
    from PIL import Image

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--image {file}: no such file.")
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(im)


def _load(args):
    from jquant.models import load
    from jquant.train import vl

    loaded = load(args.model)
    if loaded.tokenizer is None and getattr(args, "tokenizer", None) is None:
        raise FileNotFoundError(f"{loaded.path} has no tokenizer files; pass --tokenizer PATH (a tokenizer with the "
                                "vision tokens, as saved with the model).")
    if getattr(args, "tokenizer", None) is not None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    else:
        tokenizer = loaded.tokenizer
    vl.check_tokenizer(tokenizer, loaded.model.config)
    return loaded, tokenizer, _training_info(loaded.path)


def generate(args, console: Console) -> dict:
    from jquant.data.vqa_scenes import format_prompt
    from jquant.generate import max_context
    from jquant.models.qwen2_vl import generate as vl_generate
    from jquant.models.qwen2_vl import images_to_patches
    from jquant.train import vl

    _refuse_flags(args)
    images = args.image or []
    placeholders = args.prompt.count(vl.IMAGE_MARK)
    if placeholders > len(images):
        raise ValueError(f"--prompt has {placeholders} {vl.IMAGE_MARK} placeholders but {len(images)} --image; give "
                         f"one --image per {vl.IMAGE_MARK}.")
    if placeholders == 0 and len(images) > 1:
        raise ValueError(f"--prompt has no {vl.IMAGE_MARK} token but {len(images)} images were given; put "
                         f"{vl.IMAGE_MARK} where each image goes.")
    if 0 < placeholders < len(images):
        raise ValueError(f"--prompt has {placeholders} {vl.IMAGE_MARK} placeholder(s) but {len(images)} --image; give "
                         f"one {vl.IMAGE_MARK} per image.")
    loaded, tokenizer, info = _load(args)
    model, cfg = loaded.model, loaded.model.config
    expected = tuple(info["image_size"]) if "image_size" in info else None
    pixels = [read_image(f, size=expected if args.resize else None) for f in images]
    for file, image in zip(images, pixels):
        vl.check_image(image, cfg, expected, argument=f"--image {file}")
    if len({p.shape for p in pixels}) > 1:
        raise ValueError(f"the images have different sizes {[p.shape[:2] for p in pixels]}; give images of one size.")
    text = args.prompt if placeholders or not images else format_prompt(args.prompt, vl.IMAGE_MARK)
    per_image = vl.image_tokens(cfg, pixels[0].shape[:2]) if pixels else 0
    ids = vl.encode_prompt(tokenizer, cfg, text, len(pixels), per_image)
    context = max_context(model)
    if len(ids) + args.max_new_tokens > context:
        raise ValueError(f"the prompt ({len(ids)} tokens with the image placeholders) plus --max-new-tokens "
                         f"{args.max_new_tokens} exceeds the model's context of {context} tokens; pass "
                         f"--max-new-tokens {max(context - len(ids), 0)} or less.")
    pixel_values = grid = None
    if pixels:
        pixel_values, grid = images_to_patches(np.stack(pixels).astype(np.float32) / 255.0, cfg.vision)
    out = vl_generate(model, np.array([ids]), args.max_new_tokens, pixel_values, grid)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    answer = tokenizer.decode(out)
    if not args.json:
        console.print(f"[bold]{args.prompt}[/bold]{answer}")
    return {"prompt": args.prompt, "images": images, "answer": answer.strip(), "continuation": answer, "tokens": out}


def _refuse_flags(args) -> None:
    wrong = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance), ("--out", args.out),
                                      ("--frames", args.frames), ("--top-k", args.top_k)) if value is not None]
    wrong += ["--num-images"] if args.num_images != 1 else []
    wrong += ["--temperature"] if args.temperature != 0 else []
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do not apply to {args.model}: vision-language models answer greedily "
                         "(pass --image and --prompt).")


def evaluate(args, console: Console) -> dict:
    from jquant.data.vqa_scenes import RESOLUTIONS, vqa_scenes
    from jquant.train import vl

    loaded, tokenizer, info = _load(args)
    model, cfg = loaded.model, loaded.model.config
    size = tuple(info.get("image_size", (48, 48)))
    if size[0] != size[1] or size[0] not in RESOLUTIONS:
        raise ValueError(f"{loaded.path}: the VQA set has square images of {RESOLUTIONS} px; the model's image_size "
                         f"{size} is none of them.")
    vqa = vqa_scenes("test", args.n_items, size[0], seed=info.get("test_seed", 0))
    length = vl.required_length(vqa, tokenizer, cfg)
    result = {"model": str(loaded.path), "split": "test", "image_size": list(size),
              "with_image": vl.score(model, vl.encode_set(vqa, tokenizer, cfg, length), batch_size=args.batch_size)}
    if args.text_only:
        result["without_image"] = vl.score(model, vl.encode_set(vqa, tokenizer, cfg, length, image=False),
                                           batch_size=args.batch_size)
        if "text_only_baseline" in info:
            result["trained_text_only_baseline"] = info["text_only_baseline"]
    if not args.json:
        _print(console, result, args.model)
    return result


def _print(console: Console, result: dict, name: str) -> None:
    columns = [("with image", result["with_image"])]
    if "without_image" in result:
        columns.append(("same model, no image", result["without_image"]))
    if "trained_text_only_baseline" in result:
        columns.append(("text-only baseline (recorded)", result["trained_text_only_baseline"]))
    table = Table(title=f"VQA exact match: {name} ({result['with_image']['items']} test questions)")
    table.add_column("question kind")
    for title, _ in columns:
        table.add_column(title, justify="right")
    for kind in result["with_image"]["per_kind"]:
        table.add_row(kind, *(f"{c['per_kind'].get(kind, float('nan')):.3f}" for _, c in columns))
    table.add_row("overall", *(f"{c['accuracy']:.3f}" for _, c in columns))
    console.print(table)
