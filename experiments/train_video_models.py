"""Train the bundled video reference models on the emoji clips: jq-video-vae-tiny, then jq-video-tiny and
jq-cogvideox-tiny.

    python experiments/train_video_models.py --stage vae        # jq-video-vae-tiny: HunyuanVideo-style causal 3-D VAE
    python experiments/train_video_models.py --stage dit        # jq-video-tiny: HunyuanVideo-style DiT pipeline folder
    python experiments/train_video_models.py --stage cogvideox  # jq-cogvideox-tiny: CogVideoX-style DiT pipeline folder

Each stage trains with ``jquant.train.loop.fit`` in ``--workdir/<stage>`` (resumable: rerun the same command after
an interruption) and exports into the jquant-models data package (``packages/jquant-models/jquant_models/<name>``,
replaced only with ``--overwrite``) with ``reference_info.json`` (data, sizes, steps, time, machine, validation
numbers measured on the exported weights) and ``loss_curve.png``; the DiT stages add ``samples.gif`` and
``samples.png`` (rows of frames). The clips are ``jquant.data.video_scenes`` at 32x32 with the ``reference-32``
vocabulary (one or two emoji, scripted motion): short clips for the VAE (it is causal and convolutional, so
it runs on any 1 + 4k frames), 17 frames (5 latent frames) for the DiTs. Both DiT stages run the same code
(``prepare_dit_data``, ``train_dit``, ``export_dit_pipeline``) on the same clips and captions: flow matching on
jq-video-vae-tiny's latents, conditioned on jq-llama-tiny's states of the captions, sampled by the Euler flow. The
CogVideoX-style DiT is therefore not CogVideoX's DDIM v-prediction on its own VAE: both DiTs share one latent space
and one sampler, which is what this CPU can train. Prompt accuracy is per frame, by the bundled judge
(jq-emoji-classifier) on single-emoji validation clips without cuts, next to a random-label baseline
(``jquant.cli_video.evaluate_pipeline``, what ``jquant eval`` reports). ``--quick`` is a smoke run of a DiT stage
(a few clips and steps, into a scratch ``--bundle`` holding jq-video-vae-tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jquant.train.loop import LoopConfig, TrainResult

from train_image_models import BUNDLE, REPO, RESOLUTION, VOCABULARY, _machine, _write_info

MAX_LENGTH = 64  # text tokens (with the start token); longer captions (about 5% of clips) are skipped


def _clips(split: str, n: int, seed: int, frames: int) -> np.ndarray:
    """``n`` clips ``[n, F, 32, 32, 3]`` in ``[-1, 1]`` of one or two emoji."""
    return im.images_to_unit_range(video_scenes(split, n, RESOLUTION, seed, frames=frames, vocabulary=VOCABULARY).videos)


def train_vae_stage(args) -> dict:
    from jquant.cli_video import vae_legibility, validation_prompts
    from jquant.models import hf_io
    from jquant.models import hunyuan_video_vae as hv
    from jquant.models import load as load_model
    from jquant.models.vae_inflation import inflate_image_vae

    out = args.bundle / "jq-video-vae-tiny"
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    x = _clips("train", args.vae_train, 1, args.vae_frames)
    vx = _clips("validation", 64, 1, 17)
    cfg = hv.FAMILY.presets["jq-video-vae-tiny"]
    if args.vae_init == "random":
        model = hv.init_model(cfg, jax.random.key(1))
    else:  # inflated from a trained image VAE (models/vae_inflation.py)
        model = inflate_image_vae(load_model(args.vae_init).model, cfg, seed=1)
    loop = LoopConfig(steps=args.vae_steps, warmup_steps=min(100, args.vae_steps // 10), peak_lr=args.vae_lr,
                      weight_decay=0.0, checkpoint_every=50, eval_every=100, ema_decay=0.995)
    result = im.train_vae(model, x, vx[:16], loop, args.workdir / "vae", batch_size=args.vae_batch,
                          kl_weight=args.kl_weight)
    scaled = im.with_latent_scaling(model, x[:512], batch_size=32)
    chunked = np.asarray(scaled.decode(scaled.encode(jnp.asarray(vx[:4]), chunk_frames=8).mode(), chunk_frames=2))
    whole = np.asarray(scaled(jnp.asarray(vx[:4])))
    _, labels, single = validation_prompts(64, 17, RESOLUTION)
    info = {"name": "jq-video-vae-tiny", "family": "hunyuan_video_vae",
            "trained_on": f"video_scenes train split, {len(x)} clips of {args.vae_frames} frames at "
                          f"{RESOLUTION}x{RESOLUTION}, 1-2 emoji, vocabulary {VOCABULARY}",
            "config": hv.FAMILY.config_to_json(scaled.config), "steps": loop.steps, "batch_size": args.vae_batch,
            "kl_weight": args.kl_weight, "ema_decay": loop.ema_decay, "train_seconds": round(result.seconds, 1),
            "initialised_from": args.vae_init, "peak_lr": args.vae_lr,
            "machine": _machine(),
            "validation_psnr_db_17_frames": im.reconstruction_psnr(scaled, vx, batch_size=8),
            "chunked_vs_whole_max_abs_difference": float(np.max(np.abs(chunked - whole))),
            **{f"{k}_single_emoji_clips": v for k, v in vae_legibility(scaled, single, labels).items()},
            "scaling_factor": scaled.config.scaling_factor}
    hf_io.write_checkpoint(out, hv.config_to_diffusers(scaled.config), hv.to_tensors(scaled),
                           weights_name=hf_io.DIFFUSERS_FILE, overwrite=args.overwrite,
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


def _encoded_clips(vae, encoder, split: str, n: int, seed: int, batch: int = 32) -> tuple[np.ndarray, list[str], int]:
    """``(latents [n, 5, 8, 8, L], captions, skipped)``: ``n`` 17-frame clips drawn as ``video_scenes`` draws them,
    those whose caption is longer than ``MAX_LENGTH`` tokens skipped (counted), encoded ``batch`` clips at a time
    (the pixels of all clips at once would not fit in memory)."""
    from jquant.data.emoji import load_glyphs
    from jquant.data.scenes import SPLITS
    from jquant.data.video_scenes import make_clip

    encode = nnx.jit(lambda m, x: m.latents(x))
    rng, glyphs = np.random.default_rng([seed, SPLITS.index(split)]), load_glyphs()
    latents, captions, pending, skipped = [], [], [], 0
    while len(captions) < n:
        video, caption, _ = make_clip(rng, RESOLUTION, split, frames=17, vocabulary=VOCABULARY, glyphs=glyphs)
        if 1 + len(encoder.tokenizer(caption, add_special_tokens=False)["input_ids"]) > MAX_LENGTH:  # + start token
            skipped += 1
            continue
        pending.append(video)
        captions.append(caption)
        if len(pending) == batch or len(captions) == n:
            latents.append(np.asarray(encode(vae, jnp.asarray(im.images_to_unit_range(np.stack(pending))))))
            pending = []
    return np.concatenate(latents), captions, skipped


@dataclasses.dataclass(frozen=True)
class DiTData:
    """What the DiT stages train and are validated on: ``train`` (scaled latents ``[N, 5, 8, 8, L]``, one text
    encoding per distinct caption under ``text`` / ``text_mask`` / ``pooled``, the unconditional encoding),
    ``validation_latents [V, 5, 8, 8, L]`` with their captions and per-clip encodings ``validation_cond`` (name ->
    ``[V, ...]``), and how many training clips were skipped for captions over ``MAX_LENGTH`` tokens."""

    train: im.TextConditionedData
    validation_latents: np.ndarray
    validation_captions: list[str]
    validation_cond: dict[str, np.ndarray]
    skipped: int


def prepare_dit_data(vae, encoder, train: int, validation: int) -> DiTData:
    """``train`` and ``validation`` 17-frame clips (seed 2) through ``vae`` with captions encoded by ``encoder``."""
    t0 = time.time()
    latents, captions, skipped = _encoded_clips(vae, encoder, "train", train, 2)
    vlatents, vcaptions, _ = _encoded_clips(vae, encoder, "validation", validation, 2)
    index, cond = _text(encoder, captions)
    vindex, vcond = _text(encoder, vcaptions)
    unc = encoder.unconditional(1, MAX_LENGTH)
    uncond = {"text": np.asarray(unc.states[0]), "text_mask": np.asarray(unc.mask[0]), "pooled": np.asarray(unc.pooled[0])}
    data = im.TextConditionedData(latents=latents, caption_index=index, cond=cond, uncond=uncond)
    print(f"latents {latents.shape} std {latents.std():.3f}, {len(cond['text'])} distinct captions, "
          f"prepared in {time.time() - t0:.0f} s")
    return DiTData(train=data, validation_latents=vlatents, validation_captions=vcaptions,
                   validation_cond={k: v[vindex] for k, v in vcond.items()}, skipped=skipped)


def train_dit(model: nnx.Module, data: DiTData, args, workdir: Path) -> tuple[TrainResult, LoopConfig]:
    """Flow-matching training (``jquant.train.image_models.train_text_to_image``: caption dropout 0.1, EMA 0.999)
    of a video transformer whose ``flow_velocity(latents, sigmas, ...)`` takes some of the text arguments
    (``jquant.text_to_video.text_arguments``), validated by the flow-matching loss on the validation latents with
    fixed noise and timesteps; resumable in ``workdir``."""
    from jquant.sampling.training import flow_matching_loss
    from jquant.text_to_video import text_arguments

    names = text_arguments(model)
    train = im.TextConditionedData(latents=data.train.latents, caption_index=data.train.caption_index,
                                   cond={k: data.train.cond[k] for k in names},
                                   uncond={k: data.train.uncond[k] for k in names})

    def velocity(m, z, sigmas, *cond):
        return m.flow_velocity(z, sigmas, *cond)

    held = (jnp.asarray(data.validation_latents), tuple(jnp.asarray(data.validation_cond[k]) for k in names))

    def validation(m) -> float:  # the flow-matching loss on fixed validation latents, noise and timesteps
        return float(flow_matching_loss(lambda z, s, c: velocity(m, z, s, *c), held[0], held[1], jax.random.key(7)))

    loop = LoopConfig(steps=args.dit_steps, warmup_steps=min(200, args.dit_steps // 10), peak_lr=args.dit_lr,
                      weight_decay=0.01, checkpoint_every=100, eval_every=250, ema_decay=0.999)
    result = im.train_text_to_image(model, train, velocity, loop, workdir, batch_size=args.dit_batch,
                                    validation=validation, description="text-to-video")
    return result, loop


def export_dit_pipeline(args, name: str, family, model: nnx.Module, vae, encoder, data: DiTData,
                        result: TrainResult, loop: LoopConfig, notes: dict | None = None) -> dict:
    """Write the ``TextToVideo`` pipeline folder ``args.bundle / name`` (17 frames at 32 px, ``args.sample_steps``
    Euler steps, guidance ``args.guidance``) with ``reference_info.json`` (sizes, training, ``notes``, the judge's
    per-frame prompt accuracy on ``args.eval_clips`` single-emoji validation captions: ``evaluate_pipeline``),
    ``loss_curve.png``, ``samples.gif`` and ``samples.png`` (8 validation captions, seed 0); returns the info."""
    from jquant.cli_video import evaluate_pipeline
    from jquant.media import save_gif, to_uint8, video_frames_grid
    from jquant.text_to_image import save_pipeline
    from jquant.text_to_video import TextToVideo, VideoSamplingDefaults

    pipe = TextToVideo(text_encoder=encoder, transformer=model, vae=vae,
                       defaults=VideoSamplingDefaults(steps=args.sample_steps, guidance=args.guidance, shift=1.0,
                                                      max_length=MAX_LENGTH, frames=17, size=RESOLUTION))
    report = evaluate_pipeline(pipe, None, clips=args.eval_clips, steps=args.sample_steps, guidance=args.guidance)
    report["sampling_steps"] = report.pop("steps")  # "steps" is the training's
    sample_prompts = data.validation_captions[:8]
    clips = to_uint8(pipe.generate(sample_prompts, seed=0))
    latents = data.train.latents
    info = {"name": name, "family": family.name,
            "trained_on": f"video_scenes train split, {len(latents)} clips of 17 frames at {RESOLUTION}x{RESOLUTION} "
                          f"through jq-video-vae-tiny, captions encoded by jq-llama-tiny (final states, {MAX_LENGTH} "
                          f"tokens; {data.skipped} clips with longer captions skipped)",
            "config": family.config_to_json(model.config), **(notes or {}),
            "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
            "steps": loop.steps, "batch_size": args.dit_batch, "p_uncond": 0.1, "ema_decay": loop.ema_decay,
            "train_seconds": round(result.seconds, 1), "machine": _machine(),
            "validation_flow_loss": result.final_val_loss, **report, "sample_prompts": sample_prompts}

    def extra(folder: Path) -> None:
        from PIL import Image

        _write_info(folder, info, result.history, name, "flow-matching loss")
        save_gif(clips, folder / "samples.gif", fps=8, scale=3, columns=4)
        Image.fromarray(video_frames_grid(clips, scale=2)).save(folder / "samples.png")

    save_pipeline(pipe, args.bundle / name, overwrite=args.overwrite, extra_files=extra)
    return info


def _dit_inputs(args, name: str):
    """``(vae, encoder, DiTData)`` of a DiT stage exporting ``name``: the output folder is checked first."""
    from jquant.models import load
    from jquant.models.text_encoder import TextEncoder

    check_output_folder(args.bundle / name, overwrite=args.overwrite, argument="--overwrite")
    vae = load(args.bundle / "jq-video-vae-tiny").model
    encoder = TextEncoder.load("jq-llama-tiny")
    return vae, encoder, prepare_dit_data(vae, encoder, args.dit_train, args.dit_val)


def train_dit_stage(args) -> dict:
    """jq-video-tiny: the HunyuanVideo-style DiT (text states, mask and pooled state) on jq-video-vae-tiny latents."""
    from jquant.models import hunyuan_video

    vae, encoder, data = _dit_inputs(args, "jq-video-tiny")
    d, channels = encoder.hidden_size, data.train.latents.shape[-1]
    cfg = hunyuan_video.FAMILY.presets["jq-video-tiny"].replace(text_embed_dim=d, pooled_projection_dim=d,
                                                                    in_channels=channels, out_channels=channels)
    model = hunyuan_video.init_model(cfg, jax.random.key(2))
    result, loop = train_dit(model, data, args, args.workdir / "dit")
    return export_dit_pipeline(args, "jq-video-tiny", hunyuan_video.FAMILY, model, vae, encoder, data, result, loop)


def train_cogvideox_stage(args) -> dict:
    """jq-cogvideox-tiny: a CogVideoX-architecture DiT (5B-style 3-D RoPE, expert adaLN, text states only) trained
    exactly as jq-video-tiny: flow matching on the same jq-video-vae-tiny latents and jq-llama-tiny captions, sampled
    by the same Euler flow. CogVideoX itself is trained for DDIM v-prediction on its own VAE's latents; here the two
    DiTs share one latent space and one sampler, which is what a CPU can train and compare."""
    from jquant.models import cogvideox

    vae, encoder, data = _dit_inputs(args, "jq-cogvideox-tiny")
    channels = data.train.latents.shape[-1]
    cfg = cogvideox.FAMILY.presets["jq-cogvideox-tiny"].replace(text_embed_dim=encoder.hidden_size,
                                                                in_channels=channels, out_channels=channels)
    model = cogvideox.init_model(cfg, jax.random.key(2))
    result, loop = train_dit(model, data, args, args.workdir / "cogvideox")
    notes = {"objective": "rectified-flow matching (velocity ε - x_0, t = 1000 σ) on jq-video-vae-tiny's "
                          "HunyuanVideo-style latents, Euler sampling, not CogVideoX's DDIM v-prediction on its own "
                          "VAE: one latent space and sampler shared with jq-video-tiny, trainable on a CPU"}
    return export_dit_pipeline(args, "jq-cogvideox-tiny", cogvideox.FAMILY, model, vae, encoder, data, result, loop,
                               notes)


QUICK = {"dit_train": 4, "dit_val": 1, "dit_steps": 2, "dit_batch": 2, "sample_steps": 2, "eval_clips": 1}
STAGES = {"vae": train_vae_stage, "dit": train_dit_stage, "cogvideox": train_cogvideox_stage}


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
    parser.add_argument("--vae-init", default="jq-vae-tiny",
                        help="an image VAE to inflate the video VAE from (models/vae_inflation.py), or 'random' "
                             "(default: %(default)s)")
    parser.add_argument("--vae-lr", type=float, default=5e-4, help="peak learning rate of the VAE stage")
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    dit = parser.add_argument_group("the DiT stages (dit, cogvideox)")
    dit.add_argument("--dit-train", type=int, default=20000)
    dit.add_argument("--dit-val", type=int, default=256, help="validation clips of the flow-matching loss")
    dit.add_argument("--dit-steps", type=int, default=3000)
    dit.add_argument("--dit-batch", type=int, default=32)
    dit.add_argument("--dit-lr", type=float, default=5e-4)
    dit.add_argument("--guidance", type=float, default=3.0)
    dit.add_argument("--sample-steps", type=int, default=20, help="Euler steps of the exported pipeline")
    dit.add_argument("--eval-clips", type=int, default=64, help="validation captions the DiT is judged on")
    dit.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        if args.stage == "vae":
            parser.error("--quick is a smoke run of a DiT stage (dit, cogvideox); the vae stage has none.")
        vars(args).update(QUICK)
    t0 = time.time()
    info = STAGES[args.stage](args)
    print(json.dumps(info, indent=1, sort_keys=True))
    print(f"stage {args.stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
