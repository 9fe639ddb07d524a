"""Train one of jquant's reference models on the bundled corpus and export it in Hugging Face format.

``train_reference("jq-llama-tiny", steps=600, workdir="runs/tiny", export_to=...)``
trains with bf16 compute and float32 parameters, writes ``history.jsonl``,
``loss_curve.png`` and orbax checkpoints (resumable) under ``workdir``, then
exports the weights (as ``export_dtype``) together with the tokenizer, and
records the validation perplexity *of the exported weights* (float32 compute)
in ``reference_info.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax

from jquant.data import load_split, load_tokenizer
from jquant.data.windows import token_stream, token_windows
from jquant.eval.perplexity import perplexity
from jquant.models import llama
from jquant.train.trainer import TrainConfig, TrainResult, plot_history, train

EVAL_SEQ_LEN = 256


def train_reference(
    preset: str,
    train_cfg: TrainConfig,
    workdir: str | Path,
    *,
    export_to: str | Path | None = None,
    export_dtype: llama.DTypeName = "bfloat16",
    progress: bool = True,
) -> dict:
    """Train ``preset`` (a key of ``llama.PRESETS``); returns the summary written to ``reference_info.json``."""
    if preset not in llama.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(llama.PRESETS)}.")
    workdir = Path(workdir)
    tokenizer = load_tokenizer()
    cfg = llama.PRESETS[preset].replace(dtype="bfloat16", param_dtype="float32")
    if cfg.vocab_size != len(tokenizer):
        raise ValueError(f"preset {preset} has vocab_size={cfg.vocab_size} but the tokenizer has {len(tokenizer)} tokens.")
    model = llama.init_model(cfg, jax.random.key(train_cfg.seed))
    result: TrainResult = train(
        model,
        token_stream(load_split("train"), tokenizer),
        token_stream(load_split("validation"), tokenizer),
        train_cfg,
        workdir,
        progress=progress,
    )
    plot_history(result.history, workdir / "loss_curve.png", title=f"{preset}: training")

    shipped = _recast(result.model, export_dtype)
    t0 = time.perf_counter()
    val = perplexity(shipped, token_windows(load_split("validation"), tokenizer, EVAL_SEQ_LEN), progress=progress)
    summary = {
        "preset": preset,
        "parameters": sum(x.size for x in jax.tree.leaves(llama.nnx.state(shipped, llama.nnx.Param))),
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
    (workdir / "reference_info.json").write_text(json.dumps(summary, indent=2) + "\n")
    if export_to is not None:

        def extra(folder: Path) -> None:
            tokenizer.save_pretrained(folder)
            (folder / "reference_info.json").write_text(json.dumps(summary, indent=2) + "\n")
            (folder / "loss_curve.png").write_bytes((workdir / "loss_curve.png").read_bytes())

        from jquant.models import hf_io

        hf_io.write_checkpoint(export_to, llama.config_to_hf(shipped.config), llama.to_tensors(shipped), extra_files=extra)
    return summary


def _recast(model: llama.Llama, param_dtype: llama.DTypeName) -> llama.Llama:
    """The same weights stored as ``param_dtype`` with float32 compute (what a user loads from the export)."""
    cfg = model.config.replace(dtype="float32", param_dtype=param_dtype)
    return llama.from_tensors(cfg, llama.to_tensors(model), source="trained model")
