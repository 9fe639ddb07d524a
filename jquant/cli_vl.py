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


def _vqa_resolution(path: Path, info: dict) -> int:
    """The VQA set's image side for a model trained at ``info["image_size"]`` (48 when not recorded)."""
    from jquant.data.vqa_scenes import RESOLUTIONS

    size = tuple(info.get("image_size", (48, 48)))
    if size[0] != size[1] or size[0] not in RESOLUTIONS:
        raise ValueError(f"{path}: the VQA set has square images of {RESOLUTIONS} px; the model's image_size "
                         f"{size} is none of them.")
    return size[0]


def _vqa_accuracy(model, tokenizer, vqa, batch_size: int) -> dict:
    from jquant.train import vl

    length = vl.required_length(vqa, tokenizer, model.config)
    return vl.score(model, vl.encode_set(vqa, tokenizer, model.config, length), batch_size=batch_size)


def evaluate(args, console: Console) -> dict:
    from jquant.data.vqa_scenes import vqa_scenes
    from jquant.train import vl

    loaded, tokenizer, info = _load(args)
    model, cfg = loaded.model, loaded.model.config
    side = _vqa_resolution(loaded.path, info)
    vqa = vqa_scenes("test", args.n_items, side, seed=info.get("test_seed", 0))
    length = vl.required_length(vqa, tokenizer, cfg)
    result = {"model": str(loaded.path), "split": "test", "image_size": [side, side],
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


def calibration_set(tokenizer, cfg, side: int, n: int, seed: int) -> dict:
    """Qwen2-VL calibration ``{"tokens" [n, L], "pixel_values" [n, P, K], "image_grid_thw" [n, 1, 3]}`` of ``n``
    VQA train prompts with their answers and images (``side`` px). Rows hold no padding (pad tokens would enter the
    text tokens' static scales): items are drawn until ``n`` share the most common encoded length."""
    from jquant.data.vqa_scenes import format_prompt, vqa_scenes
    from jquant.models.qwen2_vl import images_to_patches
    from jquant.train import vl

    vqa = vqa_scenes("train", 8 * n, side, seed=seed)
    per_image = vl.image_tokens(cfg, (side, side))
    lengths = np.array([len(vl.encode_prompt(tokenizer, cfg, format_prompt(q, vl.IMAGE_MARK), 1, per_image))
                        + len(vl.answer_ids(tokenizer, a)) for q, a in zip(vqa.questions, vqa.answers)])
    values, counts = np.unique(lengths, return_counts=True)
    rows = np.flatnonzero(lengths == values[np.argmax(counts)])[:n]
    if len(rows) < n:
        raise ValueError(f"--calib-samples {n}: only {len(rows)} VQA prompts of one length among {8 * n} drawn; ask "
                         "for fewer.")
    chosen = type(vqa)(*(_take(values, rows) for values in vqa))
    data = vl.encode_set(chosen, tokenizer, cfg, int(values[np.argmax(counts)]))
    pixels, grid = images_to_patches(chosen.images.astype(np.float32) / 255.0, cfg.vision)
    return {"tokens": data.tokens, "pixel_values": np.asarray(pixels).reshape(n, -1, pixels.shape[-1]),
            "image_grid_thw": np.asarray(grid).reshape(n, 1, 3)}


def _take(values, rows: np.ndarray):
    return values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows]


def quantize(args, console: Console) -> dict:
    """``jquant quantize`` of a Qwen2-VL model: calibration on ``--calib-samples`` VQA train prompts with their
    images (``calibration_set``), optional save, and VQA exact match of float vs quantized on ``--n-items`` test
    questions (unless ``--no-eval``)."""
    from jquant.atomic import check_output_folder
    from jquant.checkpoint import save
    from jquant.data.vqa_scenes import vqa_scenes
    from jquant.quantization import quantize as quantize_model
    from jquant.recipes import Recipe, get

    if args.out:
        check_output_folder(args.out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    if args.calib_source != "corpus":
        raise ValueError("--calib-source ebss is for mixture-of-experts language models; vision-language models "
                         "calibrate on VQA prompts with images.")
    recipe = Recipe.from_file(args.recipe) if args.recipe.endswith((".json", ".yaml", ".yml")) else get(args.recipe)
    loaded, tokenizer, info = _load(args)
    side = _vqa_resolution(loaded.path, info)
    calib = calibration_set(tokenizer, loaded.model.config, side, args.calib_samples, args.seed)
    qmodel = quantize_model(loaded.model, recipe, calib, batch_size=args.batch_size, progress=not args.json)
    report = qmodel.quantization
    result = {"model": str(loaded.path), "recipe": recipe.to_dict(), "quantize_seconds": report.seconds,
              "calibration_prompts": int(len(calib["tokens"])), "sites": dict(report.sites),
              "unquantized": list(report.unquantized)}
    if args.out:
        result["saved_to"] = str(save(qmodel, args.out, tokenizer=tokenizer, overwrite=args.overwrite))
    if not args.no_eval:
        vqa = vqa_scenes("test", args.n_items, side, seed=info.get("test_seed", 0))
        result["float"] = _vqa_accuracy(loaded.model, tokenizer, vqa, args.batch_size)
        result["quantized"] = _vqa_accuracy(qmodel, tokenizer, vqa, args.batch_size)
    if not args.json:
        table = Table(title=f"quantize: {args.model} with {recipe.name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("quantization time (s)", f"{report.seconds:.1f}")
        if not args.no_eval:
            table.add_row("VQA exact match, float", f"{result['float']['accuracy']:.3f}")
            table.add_row(f"VQA exact match, {recipe.name}", f"{result['quantized']['accuracy']:.3f}")
        console.print(table)
        if args.out:
            console.print(f"saved to {result['saved_to']}")
    return result
