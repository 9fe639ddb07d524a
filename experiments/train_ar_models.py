"""Train the continuous-token autoregressive image models on the emoji scenes: jq-mar-tiny and jq-ecar-tiny.

    python experiments/train_ar_models.py --stage mar    # MAR-style baseline (jquant.models.mar)
    python experiments/train_ar_models.py --stage ecar   # ECAR (jquant.models.ecar), same data, steps and batch
    python experiments/train_ar_models.py --stage ecar --preset jq-ecar-tiny-2stage   # another number of stages

Both use the data of jq-mmdit-tiny (``train_image_models``: 1-2 glyph scenes at 32x32 through jq-vae-tiny, captions
encoded by jq-llama-tiny, 10 % caption dropout for classifier-free guidance) and the same steps, batch and optimizer,
so their training compute differs only by their per-step cost (reported in ``reference_info.json`` as parameters
and seconds). Training runs with ``jquant.train.loop.fit`` in ``--workdir/<stage>`` (resumable: rerun the same
command). The pipeline folder goes to ``--out`` (default ``--workdir/export/<name>``), or into the jquant-models data
package only when ``--bundle`` names it (``packages/jquant-models/jquant_models``; replaced only with
``--overwrite``), with ``reference_info.json``, ``loss_curve.png`` and ``samples.png``.

``--quick`` trains a few steps on a few hundred scenes (a smoke test of the whole path, into /tmp folders).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import train_image_models as tim

from jquant.atomic import check_output_folder
from jquant.train import image_models as im
from jquant.train.loop import LoopConfig, fit

MAX_LENGTH = 32
NAMES = {"mar": "jq-mar-tiny", "ecar": "jq-ecar-tiny"}


def _family(stage: str):
    from jquant.models import ecar, mar

    return {"mar": mar, "ecar": ecar}[stage]


def _encode(args, encoder, vae) -> dict[str, np.ndarray]:
    """The encoded scenes of both splits (latents, caption indices, caption states, the unconditional encoding),
    cached in ``--workdir`` so a resumed or second training run does not encode them again (minutes on a CPU). The
    cache file is named by the split sizes and caption length; remove it after changing jq-vae-tiny or jq-llama-tiny."""
    cache = args.workdir / f"encoded_scenes_{args.train}_{args.validation}_{MAX_LENGTH}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return dict(stored)
    x, captions, _ = tim._scenes("train", args.train, 2, (1, 2))
    vx, vcaptions, _ = tim._scenes("validation", args.validation, 2, (1, 2))
    index, states, pooled = tim._text_states(encoder, captions, MAX_LENGTH)
    vindex, vstates, vpooled = tim._text_states(encoder, vcaptions, MAX_LENGTH)
    unc = encoder.unconditional(1, MAX_LENGTH)
    arrays = {"latents": tim._latents(vae, x), "index": index, "states": states, "pooled": pooled,
              "vlatents": tim._latents(vae, vx), "vindex": vindex, "vstates": vstates, "vpooled": vpooled,
              "vcaptions": np.asarray(vcaptions), "unc_states": np.asarray(unc.states[0]),
              "unc_pooled": np.asarray(unc.pooled[0])}
    args.workdir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(cache)
    return arrays


def _data(args, encoder, vae):
    """``(TextConditionedData, validation dict, validation captions)`` of the mmdit stage's scenes."""
    a = _encode(args, encoder, vae)
    data = im.TextConditionedData(latents=a["latents"], caption_index=a["index"],
                                  cond={"states": a["states"], "pooled": a["pooled"]},
                                  uncond={"states": a["unc_states"], "pooled": a["unc_pooled"]})
    val = {"latents": jnp.asarray(a["vlatents"]), "states": jnp.asarray(a["vstates"][a["vindex"]]),
           "pooled": jnp.asarray(a["vpooled"][a["vindex"]])}
    return data, val, [str(c) for c in a["vcaptions"]]


def _sample_batch(data, batch_size: int, seed: int, p_uncond: float = 0.1):
    """``train_text_to_image``'s batches: rows of the data, captions dropped to the unconditional one."""
    n = len(data.latents)

    def sample_batch(step: int) -> dict:
        rows = im.batch_rows(n, batch_size, seed, step)
        drop = np.random.default_rng([seed, step, 2]).random(batch_size) < p_uncond
        idx = data.caption_index[rows]
        cond = []
        for name, values in data.cond.items():
            dropped = drop.reshape((batch_size,) + (1,) * (values.ndim - 1))
            cond.append(jnp.asarray(np.where(dropped, data.uncond[name][None], values[idx])))
        return {"latents": jnp.asarray(data.latents[rows]), "cond": tuple(cond)}

    return sample_batch


def train_stage(args) -> dict:
    from flax import nnx

    from jquant.checkpoint import load as load_checkpoint
    from jquant.media import image_grid, to_uint8
    from jquant.models import load
    from jquant.models.loading import resolve
    from jquant.models.text_encoder import TextEncoder
    from jquant.text_to_image import SamplingDefaults, TextToImage, save_pipeline

    name = args.preset or NAMES[args.stage]
    out = (args.bundle / name) if args.bundle is not None else (args.out or args.workdir / "export" / name)
    check_output_folder(out, overwrite=args.overwrite, argument="--overwrite")
    vae = load(resolve("jq-vae-tiny")).model
    encoder = TextEncoder.load("jq-llama-tiny")
    t0 = time.time()
    data, val, vcaptions = _data(args, encoder, vae)
    print(f"latents {data.latents.shape}, prepared in {time.time() - t0:.0f} s")
    family = _family(args.stage)
    cfg = family.FAMILY.presets[name].replace(text_dim=encoder.hidden_size, latent_size=data.latents.shape[1],
                                              latent_channels=data.latents.shape[-1])
    model = family.init_model(cfg, jax.random.key(3))

    def loss(m, batch, key):
        return m.loss(batch["latents"], *batch["cond"], key)

    validate = nnx.jit(lambda m: m.loss(val["latents"], val["states"], val["pooled"], jax.random.key(7)))
    loop = LoopConfig(steps=args.steps, warmup_steps=min(200, args.steps // 10), peak_lr=args.lr, weight_decay=0.01,
                      checkpoint_every=200, eval_every=250, ema_decay=0.999 if args.steps >= 1000 else None)
    folder = args.workdir / (args.stage if name == NAMES[args.stage] else name)  # a variant trains in its own folder
    result = fit(model, loop, folder, loss=loss,
                 sample_batch=_sample_batch(data, args.batch, loop.seed), validation=lambda m: float(validate(m)),
                 description=name)
    steps = sum(cfg.stage_steps) if args.stage == "ecar" else 20
    pipe = TextToImage(text_encoder=encoder, transformer=model, vae=vae,
                       defaults=SamplingDefaults(steps=steps, guidance=args.guidance, max_length=MAX_LENGTH))
    classifier = load_checkpoint(resolve("jq-emoji-classifier"))
    report = tim.prompt_accuracy_report(pipe, classifier, seeds=args.accuracy_seeds, steps=steps,
                                        guidance=args.guidance)
    prompts, _ = tim.single_glyph_prompts(1)
    grid_prompts = prompts[:16] + [vcaptions[i] for i in range(16)]
    grid = image_grid(to_uint8(pipe.generate(grid_prompts, seed=0)), columns=8, scale=3)
    info = {"name": name, "family": family.FAMILY.name, "trained_on": f"emoji_scenes train split, "
            f"{len(data.latents)} scenes of 1-2 glyphs at {tim.RESOLUTION}x{tim.RESOLUTION} through jq-vae-tiny, "
            f"captions encoded by jq-llama-tiny (final states, {MAX_LENGTH} tokens)",
            "config": family.FAMILY.config_to_json(cfg),
            "parameters": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
            "steps": loop.steps, "batch_size": args.batch, "p_uncond": 0.1, "ema_decay": loop.ema_decay,
            "train_seconds": round(result.seconds, 1), "machine": tim._machine(),
            "validation_loss": result.final_val_loss, **report, "grid_prompts": grid_prompts}

    def extra(folder: Path) -> None:
        from PIL import Image

        tim._write_info(folder, info, result.history, name, "flow loss of the head")
        Image.fromarray(grid).save(folder / "samples.png")

    save_pipeline(pipe, out, overwrite=args.overwrite, extra_files=extra)
    info["out"] = str(out)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(NAMES), required=True)
    parser.add_argument("--workdir", type=Path, default=tim.REPO / "runs" / "ar_models",
                        help="resumable training folders, one per stage (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="the pipeline folder to write (default: "
                        "WORKDIR/export/<name>)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="export into this models package folder instead (packages/jquant-models/jquant_models)")
    parser.add_argument("--overwrite", action="store_true", help="replace a pipeline folder jquant wrote")
    parser.add_argument("--preset", default=None, help="the family preset to train (default: the stage's model; "
                        "ecar: jq-ecar-tiny-1stage / -2stage / -4stage vary the number of stages)")
    parser.add_argument("--train", type=int, default=40000)
    parser.add_argument("--validation", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--accuracy-seeds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 600 scenes, 4 steps, batch 8")
    args = parser.parse_args()
    presets = _family(args.stage).FAMILY.presets
    if args.preset is not None and args.preset not in presets:
        parser.error(f"--preset {args.preset!r} is not a {args.stage} preset; choose from {sorted(presets)}.")
    if args.quick:
        args.train, args.validation, args.steps, args.batch, args.accuracy_seeds = 600, 32, 4, 8, 1
    t0 = time.time()
    info = train_stage(args)
    print(json.dumps(info, indent=1, sort_keys=True))
    print(f"stage {args.stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
