"""Train one of jquant's reference models on the bundled corpus and export it.

``train_reference("jq-llama-tiny", TrainConfig(steps=600), "runs/tiny", export_to=...)``
trains with bf16 compute and float32 parameters, writes ``history.jsonl``,
``loss_curve.png`` and orbax checkpoints (resumable) under ``workdir``, then
exports the weights (as ``export_dtype``, float32 compute) together with the
tokenizer, and records the validation perplexity *of the exported weights* in
``reference_info.json``. Presets come from every family's ``presets``
(``jquant.models.registry.preset``); a family with a Hugging Face export
(``to_hf``: Llama, MoE) is written as a Hugging Face folder, the others (Mamba,
RWKV-6) as a ``jquant.checkpoint`` folder. Both load with ``jquant.load``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
from flax import nnx

from jquant.atomic import check_output_folder, check_work_folder
from jquant.data import load_split, load_tokenizer
from jquant.data.windows import token_stream, token_windows
from jquant.eval.perplexity import perplexity
from jquant.models.registry import family_of, preset as find_preset
from jquant.train.trainer import RESUMABLE, TrainConfig, TrainResult, plot_history, train

EVAL_SEQ_LEN = 256


def train_reference(
    preset: str,
    train_cfg: TrainConfig,
    workdir: str | Path,
    *,
    export_to: str | Path | None = None,
    export_dtype: str = "bfloat16",
    overwrite_export: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``preset`` (a key of a family's ``presets``); returns the summary written to ``reference_info.json``.

    ``export_to`` must be new or an empty folder (``overwrite_export=True`` replaces a
    folder jquant wrote); it is checked before training starts.
    """
    family, cfg = find_preset(preset)
    workdir = Path(workdir)
    check_work_folder(workdir, argument="workdir", resumable=RESUMABLE)
    if export_to is not None:
        check_output_folder(export_to, overwrite=overwrite_export, argument="export_to",
                            overwrite_hint="overwrite_export=True")
    tokenizer = load_tokenizer()
    if cfg.vocab_size != len(tokenizer):
        raise ValueError(f"preset {preset} has vocab_size={cfg.vocab_size} but the tokenizer has {len(tokenizer)} tokens.")
    model = family.init_model(cfg.replace(dtype="bfloat16", param_dtype="float32"), jax.random.key(train_cfg.seed))
    result: TrainResult = train(
        model,
        token_stream(load_split("train"), tokenizer),
        token_stream(load_split("validation"), tokenizer),
        train_cfg,
        workdir,
        progress=progress,
    )
    plot_history(result.history, workdir / "loss_curve.png", title=f"{preset}: training")

    shipped = recast(result.model, export_dtype)
    t0 = time.perf_counter()
    val = perplexity(shipped, token_windows(load_split("validation"), tokenizer, EVAL_SEQ_LEN), progress=progress)
    summary = {
        "preset": preset,
        "family": family.name,
        "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(shipped, nnx.Param))),
        "train_config": dataclasses.asdict(train_cfg),
        "train_tokens": train_cfg.steps * train_cfg.batch_size * train_cfg.seq_len,
        "train_seconds": round(result.seconds, 1),
        "final_train_loss": result.history[-1]["loss"],
        "validation_ppl": val.ppl,
        "validation_tokens": val.n_tokens,
        "validation_seq_len": EVAL_SEQ_LEN,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "weights_dtype": export_dtype,
        "backend": jax.default_backend(),
    }
    if hasattr(shipped, "moe_layers"):
        summary["expert_usage"] = validation_expert_usage(shipped, tokenizer)
    (workdir / "reference_info.json").write_text(json.dumps(summary, indent=2) + "\n")
    if export_to is not None:
        export_reference(shipped, Path(export_to), tokenizer, summary, workdir / "loss_curve.png",
                         overwrite=overwrite_export)
    return summary


def validation_expert_usage(model: nnx.Module, tokenizer) -> dict:
    """Tokens routed to each expert of each MoE layer over the validation split."""
    from jquant.eval import expert_usage

    tokens = token_windows(load_split("validation"), tokenizer, EVAL_SEQ_LEN)
    return {"windows": len(tokens), **expert_usage(model, tokens).to_dict()}


def recast(model: nnx.Module, param_dtype: str) -> nnx.Module:
    """The same weights stored as ``param_dtype`` with float32 compute (what a user loads from the export)."""
    family = family_of(model)
    cfg = model.config.replace(dtype="float32", param_dtype=param_dtype)
    shipped = family.init_model(cfg, jax.random.key(0))
    nnx.update(shipped, jax.tree.map(lambda x: x.astype(param_dtype), nnx.state(model, nnx.Param)))
    return shipped


def export_reference(model: nnx.Module, folder: Path, tokenizer, summary: dict, loss_curve: Path, *,
                     overwrite: bool = False) -> None:
    """Write ``model`` with its tokenizer, ``reference_info.json`` and loss curve into ``folder`` (atomically)."""
    family = family_of(model)

    def extra(target: Path) -> None:
        tokenizer.save_pretrained(target)
        (target / "reference_info.json").write_text(json.dumps(summary, indent=2) + "\n")
        (target / "loss_curve.png").write_bytes(loss_curve.read_bytes())

    if family.to_hf is not None:
        family.to_hf(model, folder, extra_files=extra, overwrite=overwrite)
        return
    from jquant.checkpoint import save

    save(model, folder, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra)
