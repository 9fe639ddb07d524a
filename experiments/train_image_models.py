"""Train the bundled image reference models on the emoji scenes: the judge classifier, jq-vae-tiny, jq-mmdit-tiny.

    python experiments/train_image_models.py --stage classifier   # jq-emoji-classifier (prompt accuracy, FD-emoji)
    python experiments/train_image_models.py --stage vae          # jq-vae-tiny (4 latent channels, 32x32 -> 8x8)
    python experiments/train_image_models.py --stage mmdit        # jq-mmdit-tiny (text-to-image pipeline folder)

Each stage trains with ``jquant.train.loop.fit`` in ``--workdir/<stage>`` (resumable: rerun the same command
after an interruption) and exports into the jquant-models data package
(``packages/jquant-models/jquant_models/<name>``, replaced only with ``--overwrite``) with
``reference_info.json`` (data, sizes, steps, time, machine, validation numbers measured on the exported
weights) and ``loss_curve.png``. The scenes are ``jquant.data.scenes.emoji_scenes`` at 32x32 with the
``reference-32`` vocabulary: one glyph (classifier), one or two glyphs (VAE and MMDiT).

This trains models, it measures no method, so it does not use the experiments harness (whose rows and
tables are for results); the models' numbers are in their ``reference_info.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jquant.atomic import check_output_folder
from jquant.data.scenes import emoji_scenes
from jquant.train import image_models as im
from jquant.train.loop import LoopConfig, plot_history

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "packages" / "jquant-models" / "jquant_models"
VOCABULARY = "reference-32"
RESOLUTION = 32


def _scenes(split: str, n: int, seed: int, objects: tuple[int, ...]):
    s = emoji_scenes(split, n, RESOLUTION, seed, vocabulary=VOCABULARY, objects=objects)
    return im.images_to_unit_range(s.images), s.captions, s.labels


def _machine() -> str:
    return f"{platform.machine()} CPU x{jax.device_count()} ({jax.devices()[0].platform}), jax {jax.__version__}"


def _write_info(folder: Path, info: dict, history: list[dict], title: str, ylabel: str) -> None:
    (folder / "reference_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    plot_history(history, folder / "loss_curve.png", title=title, ylabel=ylabel)


def train_classifier_stage(args) -> dict:
    from jquant.checkpoint import save
    from jquant.models import image_classifier as ic

    out = args.bundle / "jq-emoji-classifier"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    x, _, y = _scenes("train", args.classifier_train, 0, (1,))
    vx, _, vy = _scenes("validation", 2000, 0, (1,))
    tx, _, ty = _scenes("test", 2000, 0, (1,))
    cfg = ic.ImageClassifierConfig(num_classes=int(y.max()) + 1, image_size=RESOLUTION)
    model = ic.init_model(cfg, jax.random.key(0))
    loop = LoopConfig(steps=args.classifier_steps, warmup_steps=50, peak_lr=2e-3, weight_decay=0.05,
                      checkpoint_every=100, eval_every=100)
    result = im.train_classifier(model, x, y[:, 0], vx, vy[:, 0], loop, args.workdir / "classifier",
                                 batch_size=args.classifier_batch)
    info = {"name": "jq-emoji-classifier", "family": "image_classifier", "trained_on": f"emoji_scenes train split, "
            f"{len(x)} single-glyph {RESOLUTION}x{RESOLUTION} scenes, vocabulary {VOCABULARY}",
            "config": ic.FAMILY.config_to_json(cfg), "steps": loop.steps, "batch_size": args.classifier_batch,
            "train_seconds": round(result.seconds, 1), "machine": _machine(),
            "validation_accuracy": im.classifier_accuracy(model, vx, vy[:, 0]),
            "test_accuracy": im.classifier_accuracy(model, tx, ty[:, 0]),
            "chance_accuracy": 1.0 / cfg.num_classes}
    save(model, out, overwrite=args.overwrite,
         extra_files=lambda f: _write_info(f, info, result.history, "jq-emoji-classifier", "loss / (1 - accuracy)"))
    return info


def train_vae_stage(args) -> dict:
    from jquant.models import hf_io, vae as vae_mod

    out = args.bundle / "jq-vae-tiny"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    x, _, _ = _scenes("train", args.vae_train, 1, (1, 2))
    vx, _, _ = _scenes("validation", 1000, 1, (1, 2))
    cfg = vae_mod.FAMILY.presets["jq-vae-tiny"]
    model = vae_mod.init_model(cfg, jax.random.key(1))
    loop = LoopConfig(steps=args.vae_steps, warmup_steps=100, peak_lr=1e-3, weight_decay=0.0, checkpoint_every=100,
                      eval_every=250, ema_decay=0.995)
    result = im.train_vae(model, x, vx, loop, args.workdir / "vae", batch_size=args.vae_batch,
                          kl_weight=args.kl_weight)
    scaled = im.with_latent_scaling(model, x[:4000])
    info = {"name": "jq-vae-tiny", "family": "vae", "trained_on": f"emoji_scenes train split, {len(x)} scenes of "
            f"1-2 glyphs at {RESOLUTION}x{RESOLUTION}, vocabulary {VOCABULARY}",
            "steps": loop.steps, "batch_size": args.vae_batch, "kl_weight": args.kl_weight, "ema_decay": loop.ema_decay,
            "train_seconds": round(result.seconds, 1), "machine": _machine(),
            "validation_psnr_db": im.reconstruction_psnr(scaled, vx),
            "shift_factor": scaled.config.shift_factor, "scaling_factor": scaled.config.scaling_factor}
    hf_io.write_checkpoint(out, vae_mod.config_to_diffusers(scaled.config), vae_mod.to_tensors(scaled),
                           weights_name=hf_io.DIFFUSERS_FILE, overwrite=args.overwrite,
                           extra_files=lambda f: _write_info(f, info, result.history, "jq-vae-tiny",
                                                             "loss / -PSNR (dB)"))
    return info


def _text_states(encoder, captions: list[str], max_length: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray]:
    """``(index [N], states [U, S, D], pooled [U, D])``: one encoding per distinct caption."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    states, pooled = [], []
    for i in range(0, len(unique), batch):
        enc = encoder.encode(unique[i:i + batch], max_length)
        states.append(np.asarray(enc.states, np.float32))
        pooled.append(np.asarray(enc.pooled, np.float32))
    return np.array([where[c] for c in captions], np.int32), np.concatenate(states), np.concatenate(pooled)


def _latents(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    from flax import nnx

    encode = nnx.jit(lambda m, x: m.latents(x))
    return np.concatenate([np.asarray(encode(vae, images[i:i + batch])) for i in range(0, len(images), batch)])


def single_glyph_prompts(seeds: int) -> tuple[list[str], np.ndarray]:
    """Prompts ``"<glyph> on a <colour> background"`` for every vocabulary glyph, one colour per seed, and labels."""
    from jquant.data.emoji import load_glyphs
    from jquant.data.scenes import COLORS, vocabulary_ids

    glyphs = load_glyphs()
    ids = vocabulary_ids(VOCABULARY, glyphs)
    colours = list(COLORS)
    prompts, labels = [], []
    for label, gid in enumerate(ids):
        for k in range(seeds):
            prompts.append(f"{glyphs.phrases[gid]} on a {colours[(label + 3 * k) % len(colours)]} background")
            labels.append(label)
    return prompts, np.asarray(labels)


def prompt_accuracy_report(pipe, classifier, seeds: int, steps: int, guidance: float | None) -> dict:
    """Prompt accuracy of single-glyph prompts (the judge's top-1 against the prompted glyph), next to the accuracy
    the same predictions get against shuffled labels (the random-label baseline) and chance."""
    from jquant.eval.image import prompt_accuracy

    prompts, labels = single_glyph_prompts(seeds)
    images = np.concatenate([np.asarray(pipe.generate(prompts[i:i + 64], seed=1000 + i, steps=steps,
                                                      guidance=guidance)) for i in range(0, len(prompts), 64)])
    acc = float(prompt_accuracy(classifier, images, labels))
    shuffled = np.random.default_rng(0).permutation(labels)
    return {"prompt_accuracy": acc, "random_label_accuracy": float(prompt_accuracy(classifier, images, shuffled)),
            "chance": 1.0 / (labels.max() + 1), "prompts": len(prompts), "sampling_steps": steps,
            "guidance": guidance}


def train_mmdit_stage(args) -> dict:
    from jquant.checkpoint import load as load_checkpoint
    from jquant.models import load, sd3
    from jquant.models.text_encoder import TextEncoder
    from jquant.sampling.training import flow_matching_loss
    from jquant.media import image_grid, to_uint8
    from jquant.text_to_image import SamplingDefaults, TextToImage, save_pipeline

    out = args.bundle / "jq-mmdit-tiny"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    vae = load(args.bundle / "jq-vae-tiny").model
    encoder = TextEncoder.load("jq-llama-tiny")
    max_length = 32
    x, captions, _ = _scenes("train", args.mmdit_train, 2, (1, 2))
    vx, vcaptions, _ = _scenes("validation", 512, 2, (1, 2))
    t0 = time.time()
    latents, vlatents = _latents(vae, x), _latents(vae, vx)
    index, states, pooled = _text_states(encoder, captions, max_length)
    vindex, vstates, vpooled = _text_states(encoder, vcaptions, max_length)
    unc = encoder.unconditional(1, max_length)
    data = im.TextConditionedData(latents=latents, caption_index=index, cond={"states": states, "pooled": pooled},
                                  uncond={"states": np.asarray(unc.states[0]), "pooled": np.asarray(unc.pooled[0])})
    print(f"latents {latents.shape} std {latents.std():.3f}, {len(states)} distinct captions, "
          f"prepared in {time.time() - t0:.0f} s")
    d = encoder.hidden_size
    cfg = sd3.FAMILY.presets["jq-mmdit-tiny"].replace(joint_attention_dim=d, pooled_projection_dim=d,
                                                       sample_size=latents.shape[1], in_channels=latents.shape[-1])
    model = sd3.init_model(cfg, jax.random.key(2))

    def velocity(m, z, sigmas, text, pooled_):
        return m.flow_velocity(z, sigmas, text, pooled_)

    val = {"latents": jnp.asarray(vlatents), "states": jnp.asarray(vstates[vindex]),
           "pooled": jnp.asarray(vpooled[vindex])}

    def validation(m) -> float:  # the flow-matching loss on fixed validation latents, noise and timesteps
        return float(flow_matching_loss(lambda z, s, c: velocity(m, z, s, *c), val["latents"],
                                        (val["states"], val["pooled"]), jax.random.key(7)))

    loop = LoopConfig(steps=args.mmdit_steps, warmup_steps=min(200, args.mmdit_steps // 10), peak_lr=args.mmdit_lr,
                      weight_decay=0.01,
                      checkpoint_every=200, eval_every=250, ema_decay=0.999)
    result = im.train_text_to_image(model, data, velocity, loop, args.workdir / "mmdit", batch_size=args.mmdit_batch,
                                    validation=validation)
    pipe = TextToImage(text_encoder=encoder, transformer=model, vae=vae,
                       defaults=SamplingDefaults(steps=20, guidance=args.guidance, shift=1.0, max_length=max_length))
    classifier = load_checkpoint(args.bundle / "jq-emoji-classifier")
    report = prompt_accuracy_report(pipe, classifier, seeds=4, steps=20, guidance=args.guidance)
    prompts, _ = single_glyph_prompts(1)
    grid_prompts = prompts[:16] + [vcaptions[i] for i in range(16)]
    grid = image_grid(to_uint8(pipe.generate(grid_prompts, seed=0)), columns=8, scale=3)
    info = {"name": "jq-mmdit-tiny", "family": "sd3", "trained_on": f"emoji_scenes train split, {len(x)} scenes of "
            f"1-2 glyphs at {RESOLUTION}x{RESOLUTION} through jq-vae-tiny, captions encoded by jq-llama-tiny "
            f"(final states, {max_length} tokens)", "config": sd3.FAMILY.config_to_json(cfg),
            "parameters": int(sum(v.size for v in jax.tree.leaves(nnx_params(model)))),
            "steps": loop.steps, "batch_size": args.mmdit_batch, "p_uncond": 0.1, "ema_decay": loop.ema_decay,
            "train_seconds": round(result.seconds, 1), "machine": _machine(),
            "validation_flow_loss": result.final_val_loss, **report, "grid_prompts": grid_prompts}

    def extra(folder: Path) -> None:
        from PIL import Image

        _write_info(folder, info, result.history, "jq-mmdit-tiny", "flow-matching loss")
        Image.fromarray(grid).save(folder / "samples.png")

    save_pipeline(pipe, out, overwrite=args.overwrite, extra_files=extra)
    return info


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


STAGES = {"classifier": train_classifier_stage, "vae": train_vae_stage, "mmdit": train_mmdit_stage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "image_models",
                        help="resumable training folders, one per stage (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundled model jquant wrote")
    parser.add_argument("--bundle", type=Path, default=BUNDLE,
                        help="where the models are read from and exported to (default: %(default)s)")
    parser.add_argument("--classifier-train", type=int, default=20000)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--classifier-batch", type=int, default=64)
    parser.add_argument("--vae-train", type=int, default=30000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--mmdit-train", type=int, default=40000)
    parser.add_argument("--mmdit-steps", type=int, default=4000)
    parser.add_argument("--mmdit-batch", type=int, default=64)
    parser.add_argument("--mmdit-lr", type=float, default=5e-4)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    t0 = time.time()
    info = STAGES[args.stage](args)
    print(json.dumps(info, indent=1, sort_keys=True))
    print(f"stage {args.stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
