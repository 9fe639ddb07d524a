"""Train the bundled video reference models on the emoji clips: jq-video-vae-tiny, then jq-video-tiny.

    python experiments/train_video_models.py --stage vae   # jq-video-vae-tiny: HunyuanVideo-style causal 3-D VAE
    python experiments/train_video_models.py --stage dit   # jq-video-tiny: HunyuanVideo-style DiT pipeline folder

Each stage trains with ``jquant.train.loop.fit`` in ``--workdir/<stage>`` (resumable: rerun the same command after
an interruption) and exports into the jquant-models data package (``packages/jquant-models/jquant_models/<name>``,
replaced only with ``--overwrite``) with ``reference_info.json`` (data, sizes, steps, time, machine, validation
numbers measured on the exported weights) and ``loss_curve.png``; the DiT stage adds ``samples.gif`` and
``samples.png`` (rows of frames). The clips are ``jquant.data.video_scenes`` at 32x32 with the ``reference-32``
vocabulary (one or two emoji, scripted motion): short clips for the VAE (it is causal and convolutional, so
it runs on any 1 + 4k frames), 17 frames (5 latent frames) for the DiT. Prompt accuracy is per frame, by the
bundled judge (jq-emoji-classifier) on single-emoji clips without cuts, next to a random-label baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.atomic import check_output_folder
from jquant.data.video_scenes import video_scenes
from jquant.train import image_models as im
from jquant.train.loop import LoopConfig

from train_image_models import BUNDLE, REPO, RESOLUTION, VOCABULARY, _machine, _write_info

MAX_LENGTH = 32
CLEAN_MOTIONS = ("still", "drift", "fast")  # single-emoji clips whose glyph is visible in every frame


def _clips(split: str, n: int, seed: int, frames: int, objects=(1, 2), motions=None):
    kwargs = {} if motions is None else {"motions": motions}
    s = video_scenes(split, n, RESOLUTION, seed, frames=frames, vocabulary=VOCABULARY, objects=objects, **kwargs)
    return im.images_to_unit_range(s.videos), s.captions, s


def train_vae_stage(args) -> dict:
    from jquant.models import hunyuan_video_vae as hv

    out = args.bundle / "jq-video-vae-tiny"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    x, _, _ = _clips("train", args.vae_train, 1, args.vae_frames)
    vx, _, _ = _clips("validation", 64, 1, 17)
    cfg = hv.FAMILY.presets["jq-video-vae-tiny"]
    model = hv.init_model(cfg, jax.random.key(1))
    loop = LoopConfig(steps=args.vae_steps, warmup_steps=min(100, args.vae_steps // 10), peak_lr=1e-3,
                      weight_decay=0.0, checkpoint_every=50, eval_every=100, ema_decay=0.995)
    result = im.train_vae(model, x, vx[:16], loop, args.workdir / "vae", batch_size=args.vae_batch,
                          kl_weight=args.kl_weight)
    scaled = im.with_latent_scaling(model, x[:512], batch_size=32)
    chunked = np.asarray(scaled.decode(scaled.encode(jnp.asarray(vx[:4]), chunk_frames=8).mode(), chunk_frames=2))
    whole = np.asarray(scaled(jnp.asarray(vx[:4])))
    info = {"name": "jq-video-vae-tiny", "family": "hunyuan_video_vae",
            "trained_on": f"video_scenes train split, {len(x)} clips of {args.vae_frames} frames at "
                          f"{RESOLUTION}x{RESOLUTION}, 1-2 emoji, vocabulary {VOCABULARY}",
            "config": hv.FAMILY.config_to_json(scaled.config), "steps": loop.steps, "batch_size": args.vae_batch,
            "kl_weight": args.kl_weight, "ema_decay": loop.ema_decay, "train_seconds": round(result.seconds, 1),
            "machine": _machine(),
            "validation_psnr_db_17_frames": im.reconstruction_psnr(scaled, vx, batch_size=8),
            "chunked_vs_whole_max_abs_difference": float(np.max(np.abs(chunked - whole))),
            "scaling_factor": scaled.config.scaling_factor}
    hv.FAMILY.to_diffusers(scaled, out, overwrite=args.overwrite,
                           extra_files=lambda f: _write_info(f, info, result.history, "jq-video-vae-tiny",
                                                             "loss / -PSNR (dB)"))
    return info


def _text(encoder, captions: list[str], batch: int = 512) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(index [N], {"text" [U, S, D], "text_mask" [U, S], "pooled" [U, D]})``: one encoding per distinct caption."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    parts: dict[str, list] = {"text": [], "text_mask": [], "pooled": []}
    for i in range(0, len(unique), batch):
        enc = encoder.encode(unique[i:i + batch], MAX_LENGTH)
        for name, value in (("text", enc.states), ("text_mask", enc.mask), ("pooled", enc.pooled)):
            parts[name].append(np.asarray(value))
    return np.array([where[c] for c in captions], np.int32), {k: np.concatenate(v) for k, v in parts.items()}


def _encoded_clips(vae, split: str, n: int, seed: int, batch: int = 32) -> tuple[np.ndarray, list[str]]:
    """``(latents [n, 5, 8, 8, 4], captions)`` of ``n`` 17-frame clips, drawn as ``video_scenes`` draws them and
    encoded ``batch`` clips at a time (the pixels of all clips at once would not fit in memory)."""
    from jquant.data.emoji import load_glyphs
    from jquant.data.video_scenes import make_clip
    from jquant.data.scenes import SPLITS

    encode = nnx.jit(lambda m, x: m.latents(x))
    rng, glyphs = np.random.default_rng([seed, SPLITS.index(split)]), load_glyphs()
    latents, captions = [], []
    for start in range(0, n, batch):
        clips = [make_clip(rng, RESOLUTION, split, frames=17, vocabulary=VOCABULARY, glyphs=glyphs)
                 for _ in range(min(batch, n - start))]
        latents.append(np.asarray(encode(vae, jnp.asarray(im.images_to_unit_range(np.stack([c[0] for c in clips]))))))
        captions += [c[1] for c in clips]
    return np.concatenate(latents), captions


def prompt_accuracy_report(pipe, classifier, n: int, steps: int, guidance: float | None) -> dict:
    """Per-frame prompt accuracy of single-emoji validation captions without cuts (the judge's top-1 against the
    clip's glyph, frame by frame), next to the same predictions scored against shuffled labels."""
    from jquant.eval.video import frame_prompt_accuracy

    _, captions, scenes = _clips("validation", n, 5, pipe.defaults.frames, objects=(1,), motions=CLEAN_MOTIONS)
    labels = np.array([t.labels[0, 0] for t in scenes.truths])
    videos = np.concatenate([np.asarray(pipe.generate(captions[i:i + 16], seed=1000 + i, steps=steps,
                                                      guidance=guidance)) for i in range(0, n, 16)])
    per_frame = frame_prompt_accuracy(classifier, videos, labels)
    shuffled = frame_prompt_accuracy(classifier, videos, np.random.default_rng(0).permutation(labels))
    return {"frame_prompt_accuracy": float(per_frame.mean()), "frame_prompt_accuracy_per_frame": per_frame.tolist(),
            "random_label_accuracy": float(shuffled.mean()), "chance": 1.0 / 32, "prompts": n,
            "sampling_steps": steps, "guidance": guidance}


def train_dit_stage(args) -> dict:
    from jquant.checkpoint import load as load_checkpoint
    from jquant.media import save_gif, to_uint8, video_frames_grid
    from jquant.models import hunyuan_video, load
    from jquant.models.text_encoder import TextEncoder
    from jquant.sampling.training import flow_matching_loss
    from jquant.text_to_image import save_pipeline
    from jquant.text_to_video import TextToVideo, VideoSamplingDefaults

    out = args.bundle / "jq-video-tiny"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    vae = load(args.bundle / "jq-video-vae-tiny").model
    encoder = TextEncoder.load("jq-llama-tiny")
    t0 = time.time()
    latents, captions = _encoded_clips(vae, "train", args.dit_train, 2)
    vlatents, vcaptions = _encoded_clips(vae, "validation", 256, 2)
    index, cond = _text(encoder, captions)
    vindex, vcond = _text(encoder, vcaptions)
    unc = encoder.unconditional(1, MAX_LENGTH)
    uncond = {"text": np.asarray(unc.states[0]), "text_mask": np.asarray(unc.mask[0]), "pooled": np.asarray(unc.pooled[0])}
    data = im.TextConditionedData(latents=latents, caption_index=index, cond=cond, uncond=uncond)
    print(f"latents {latents.shape} std {latents.std():.3f}, {len(cond['text'])} distinct captions, "
          f"prepared in {time.time() - t0:.0f} s")
    d = encoder.hidden_size
    cfg = hunyuan_video.FAMILY.presets["jq-video-dit-tiny"].replace(text_embed_dim=d, pooled_projection_dim=d,
                                                                    in_channels=latents.shape[-1],
                                                                    out_channels=latents.shape[-1])
    model = hunyuan_video.init_model(cfg, jax.random.key(2))

    def velocity(m, z, sigmas, text, mask, pooled):
        return m.flow_velocity(z, sigmas, text, mask, pooled)

    held = (jnp.asarray(vlatents), tuple(jnp.asarray(vcond[k][vindex]) for k in ("text", "text_mask", "pooled")))

    def validation(m) -> float:  # the flow-matching loss on fixed validation latents, noise and timesteps
        return float(flow_matching_loss(lambda z, s, c: velocity(m, z, s, *c), held[0], held[1], jax.random.key(7)))

    loop = LoopConfig(steps=args.dit_steps, warmup_steps=min(200, args.dit_steps // 10), peak_lr=args.dit_lr,
                      weight_decay=0.01, checkpoint_every=100, eval_every=250, ema_decay=0.999)
    result = im.train_text_to_image(model, data, velocity, loop, args.workdir / "dit", batch_size=args.dit_batch,
                                    validation=validation, description="text-to-video")
    pipe = TextToVideo(text_encoder=encoder, transformer=model, vae=vae,
                       defaults=VideoSamplingDefaults(steps=20, guidance=args.guidance, shift=1.0,
                                                      max_length=MAX_LENGTH, frames=17, size=RESOLUTION))
    classifier = load_checkpoint(args.bundle / "jq-emoji-classifier")
    report = prompt_accuracy_report(pipe, classifier, n=64, steps=20, guidance=args.guidance)
    sample_prompts = vcaptions[:8]
    clips = to_uint8(pipe.generate(sample_prompts, seed=0))
    info = {"name": "jq-video-tiny", "family": "hunyuan_video",
            "trained_on": f"video_scenes train split, {len(latents)} clips of 17 frames at {RESOLUTION}x{RESOLUTION} "
                          f"through jq-video-vae-tiny, captions encoded by jq-llama-tiny (final states, {MAX_LENGTH} "
                          "tokens)", "config": hunyuan_video.FAMILY.config_to_json(cfg),
            "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
            "steps": loop.steps, "batch_size": args.dit_batch, "p_uncond": 0.1, "ema_decay": loop.ema_decay,
            "train_seconds": round(result.seconds, 1), "machine": _machine(),
            "validation_flow_loss": result.final_val_loss, **report, "sample_prompts": sample_prompts}

    def extra(folder: Path) -> None:
        from PIL import Image

        _write_info(folder, info, result.history, "jq-video-tiny", "flow-matching loss")
        save_gif(clips, folder / "samples.gif", fps=8, scale=3, columns=4)
        Image.fromarray(video_frames_grid(clips, scale=2)).save(folder / "samples.png")

    save_pipeline(pipe, out, overwrite=args.overwrite, extra_files=extra)
    return info


STAGES = {"vae": train_vae_stage, "dit": train_dit_stage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "video_models",
                        help="resumable training folders, one per stage (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundled model jquant wrote")
    parser.add_argument("--bundle", type=Path, default=BUNDLE,
                        help="where the models are read from and exported to (default: %(default)s)")
    parser.add_argument("--vae-train", type=int, default=8000)
    parser.add_argument("--vae-frames", type=int, default=5, help="frames per training clip (1 + 4k)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--dit-train", type=int, default=20000)
    parser.add_argument("--dit-steps", type=int, default=3000)
    parser.add_argument("--dit-batch", type=int, default=32)
    parser.add_argument("--dit-lr", type=float, default=5e-4)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    t0 = time.time()
    info = STAGES[args.stage](args)
    print(json.dumps(info, indent=1, sort_keys=True))
    print(f"stage {args.stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
