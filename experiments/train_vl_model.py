"""Train the bundled vision-language reference model jq-vl-tiny on the VQA set, with its text-only baseline.

    python experiments/train_vl_model.py                       # full run: text-only baseline, then jq-vl-tiny
    python experiments/train_vl_model.py --steps 20 --quick    # a smoke run: small sets, export into the workdir

jq-vl-tiny is the ``qwen2_vl`` preset: jq-llama-tiny's decoder (its trained weights; the embedding and lm_head
grown by the four vision tokens, ``jquant.train.vl.vl_from_lm``) under a random 3-block vision tower and 2x2
merger. It trains on ``jquant.data.vqa_scenes`` (48x48 images -> 36 image tokens) with the answer-only loss of
``jquant.train.vl`` (AdamW, warm-up + cosine, EMA; ``jquant.train.loop.fit``, resumable in ``--workdir``),
validated by greedy exact match every ``--eval-every`` steps.

No frozen phase: the usual recipe (train the merger with the LM frozen, then unfreeze) protects a large LM's
language skills from the first noisy image features; here the LM is tiny, its only job is the short answers,
and the new vocabulary rows and the answer words must be learnt anyway, so everything trains from step 0
(warm-up keeps the first updates small).

The text-only baseline is the same LM trained the same way (same steps, batch, schedule, data) on the prompts
without the image (``--workdir/text``): what a model can learn from the questions alone. Its test accuracy per
kind goes into jq-vl-tiny's ``reference_info.json`` next to the model's, with the lookup baseline of
``vqa_scenes.text_only_baseline`` (each question text's most common training answer) and chance. Test numbers
are measured on the exported (bfloat16) weights with float32 compute.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
from flax import nnx

from jquant.atomic import check_output_folder
from jquant.data.vqa_scenes import QUESTION_KINDS, answer_vocabulary, text_only_baseline, vqa_scenes
from jquant.models import load
from jquant.models.qwen2_vl import FAMILY
from jquant.train import vl
from jquant.train.loop import LoopConfig, fit
from jquant.train.reference import recast

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "packages" / "jquant-models" / "jquant_models"
NAME, BASE = "jq-vl-tiny", "jq-llama-tiny"
SEEDS = {"train": 0, "validation": 0, "test": 0}


def _machine() -> str:
    return f"{platform.machine()} CPU x{jax.device_count()} ({jax.devices()[0].platform}), jax {jax.__version__}"


def _train(model, train: vl.EncodedSet, val: vl.EncodedSet, args, workdir: Path, description: str):
    """``loop.fit`` with the answer loss; validation = 1 - greedy exact match."""
    cfg = model.config
    context = vl.vision_context(model, (args.resolution, args.resolution)) if train.images is not None else None
    loop = LoopConfig(steps=args.steps, warmup_steps=min(100, args.steps // 10), peak_lr=args.lr, weight_decay=0.01,
                      checkpoint_every=min(100, args.steps), eval_every=min(args.eval_every, args.steps),
                      ema_decay=args.ema, seed=args.seed)
    return fit(model, loop, workdir, loss=lambda m, batch, key: vl.answer_loss(m, batch, context),
               sample_batch=vl.batch_sampler(train, cfg, args.batch, args.seed),
               validation=lambda m: 1.0 - vl.score(m, val)["accuracy"], description=description), loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--resolution", type=int, default=48, choices=(32, 48, 64))
    parser.add_argument("--train-items", type=int, default=30000)
    parser.add_argument("--val-items", type=int, default=450)
    parser.add_argument("--test-items", type=int, default=1800)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the text-only baseline")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256 train / 90 validation / 90 test items, export into --workdir")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "vl_model")
    parser.add_argument("--out", type=Path, default=None, help=f"export folder (default: the bundle's {NAME})")
    parser.add_argument("--overwrite", action="store_true", help="replace an export jquant wrote")
    args = parser.parse_args()
    if args.quick:
        args.train_items, args.val_items, args.test_items = 256, 90, 90
    out = args.out or (args.workdir / NAME if args.quick else BUNDLE / NAME)
    check_output_folder(out, overwrite=args.overwrite, argument="--out", overwrite_hint="--overwrite")
    t0 = time.time()

    cfg = FAMILY.presets[NAME]
    lm = load(BASE, param_dtype="float32")
    tokenizer = vl.extend_tokenizer(lm.tokenizer, cfg)
    sets = {split: vqa_scenes(split, n, args.resolution, SEEDS[split])
            for split, n in (("train", args.train_items), ("validation", args.val_items), ("test", args.test_items))}
    lengths = {image: max(vl.required_length(s, tokenizer, cfg, image=image) for s in sets.values())
               for image in (True, False)}
    encoded = {(split, image): vl.encode_set(s, tokenizer, cfg, lengths[image], image=image)
               for split, s in sets.items() for image in ((True,) if args.no_baseline else (True, False))}
    length = lengths[True]
    print(f"data: {len(sets['train'].questions)} train items, rows of {length} tokens, prepared in "
          f"{time.time() - t0:.0f} s")

    baseline = None
    if not args.no_baseline:
        text_model = vl.vl_from_lm(lm.model, cfg, jax.random.key(args.seed))
        text_result, _ = _train(text_model, encoded["train", False], encoded["validation", False], args,
                                args.workdir / "text", "text-only baseline")
        baseline = vl.score(recast(text_result.model, "bfloat16"), encoded["test", False])
        baseline.update(train_seconds=round(text_result.seconds, 1),
                        how="the same LM (jq-llama-tiny grown to the VL vocabulary) trained the same way (steps, "
                            "batch, schedule, data) on the prompts without the image")

    model = vl.vl_from_lm(lm.model, cfg, jax.random.key(args.seed))
    result, loop = _train(model, encoded["train", True], encoded["validation", True], args, args.workdir / "vl", NAME)
    shipped = recast(result.model, "bfloat16")
    test = vl.score(shipped, encoded["test", True])
    train_qa, test_qa = ((s.questions, s.answers, s.kinds) for s in (sets["train"], sets["test"]))
    info = {
        "name": NAME, "family": FAMILY.name, "initialised_from": BASE,
        "trained_on": f"vqa_scenes train split, {args.train_items} items at {args.resolution}x{args.resolution} "
                      f"(seed {SEEDS['train']}), kinds {list(QUESTION_KINDS)}",
        "image_size": [args.resolution, args.resolution], "test_seed": SEEDS["test"],
        "config": FAMILY.config_to_json(shipped.config),
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(shipped, nnx.Param)))),
        "steps": loop.steps, "batch_size": args.batch, "peak_lr": loop.peak_lr, "ema_decay": loop.ema_decay,
        "loss": "cross-entropy on the answer tokens and the closing <eos> only", "frozen_phase": "none",
        "train_seconds": round(result.seconds, 1), "machine": _machine(), "weights_dtype": "bfloat16",
        "validation_accuracy": 1.0 - result.final_val_loss,
        "test_items": len(test_qa[0]), "test_accuracy": test["accuracy"], "test_accuracy_per_kind": test["per_kind"],
        "test_target_loss": test["target_loss"],
        "text_only_baseline": baseline,
        "lookup_text_only_baseline_per_kind": text_only_baseline(tuple(train_qa), tuple(test_qa)),
        "chance_per_kind": {k: 1.0 / len(answer_vocabulary(k)) for k in QUESTION_KINDS},
        "metric": "greedy exact match of the answer and <eos> (one teacher-forced pass, jquant.train.vl.score)",
    }
    vl.export(shipped, tokenizer, out, info, history=result.history, overwrite=args.overwrite)
    print(json.dumps(info, indent=1, sort_keys=True))
    steps = [h for h in result.history if h["step"] > 1]
    if len(steps) > 1:
        per_step = (steps[-1]["seconds"] - steps[0]["seconds"]) / (steps[-1]["step"] - steps[0]["step"])
        print(f"{per_step:.2f} s per VL training step (batch {args.batch}, validation included)")
    print(f"exported to {out}; done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
