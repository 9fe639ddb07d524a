"""Train jq-llama-long: jq-llama-small's shape with a 4096-token context that can retrieve across it.

Three steps, so the training itself runs where no tokenizer is installed (the GPU machine). The shipped
model is two GPU runs (H100, about 5 and 2 minutes):

    python experiments/train_long_context.py prepare --out runs/long/data.npz
    python experiments/train_long_context.py train --data runs/long/data.npz --workdir runs/long_gpu --steps 600
    python experiments/train_long_context.py train --data runs/long/data.npz --workdir runs/long2 --steps 230 \
        --warmup-steps 20 --peak-lr 1e-3 --needles-per-row 8 --init runs/long_gpu
    python experiments/train_long_context.py export --workdir runs/long2

Neither run taught the model to retrieve (exact-answer accuracy about 0 on secret-number and passage
recall), nor did a CPU run with repeated passages (``--task passages``) stopped after 70 steps with no drop
in loss, nor 300 CPU steps (8 x 512 tokens, lr 1e-3) from the shipped model on repeated runs of independently
drawn tokens (``--task scrambled``): it learned their unigram statistics (NLL 9.8 -> 6.5) but predicted the
second copy no better than the first. Two further CPU probes on 256-token rows, half of them pairs of
scrambled runs, also showed no copying: 300 steps from that run (batch 16, lr 1e-3; second-copy NLL stayed
between 6.64 and 6.77, against 5.9 for the other tokens, while natural-text NLL rose 3.62 -> 3.81) and 100
steps of a 2-layer model from scratch (batch 32, lr 2e-3). A 10M-parameter
model on this little data does not form the copying (induction) heads retrieval needs; thousands of steps on
a GPU are the next thing to try. Multi-query associative recall (the rows ``--task recall`` draws, ``jquant.data.recall``:
blocks of 16 one-token keys with one-token values, queried later; half the rows dense, half spread over text) did
not start either in two CPU probes (stand-alone scripts on those rows): 100 steps from the shipped model (256-token rows, batch 16, lr 1e-3, 70% recall
rows) left teacher-forced value accuracy where it started (0.15 including stray key repeats in the text, while
validation loss rose 3.69 -> 3.94), and 350 steps of a 2-layer model from scratch on dense rows only (128 tokens,
batch 32, lr 2e-3, loss on the query values) stayed at 0. ``experiments/recall_probe.py`` measures that smallest
case reproducibly (``experiments/results/recall_probe.md``): a 2-layer, 128-wide model on dense 8-pair rows for 4000
steps (about 40 minutes on the CPU) stays at the accuracy of knowing only that the answer is one of the block's
values. Zoology's MQAR runs train for tens of thousands of steps, which is GPU work here: run that script's sweep
there first to find a size and learning rate that learn, then this script's ``--task recall``.

``prepare`` tokenizes the corpus and the needle pieces (jquant.data.needle); ``train`` draws
batches of ``--seq-len`` windows where a fraction ``--needle-fraction`` of the rows carry a
needle and, later in the row, its question and answer (``needle.training_window``), so the
model learns to copy a fact from anywhere in its context; it writes the weights (``params_<i>.npz``, bfloat16) and the
loss history. ``export`` writes the Hugging Face folder into packages/jquant-models/jquant_models/jq-llama-long
with its validation perplexity (256-token windows, as the other reference models, and
eight 4096-token windows).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jquant.data.needle import NeedlePieces, repeat_window, training_window
from jquant.data.recall import RecallAlphabet, recall_alphabet, recall_window
from jquant.models import llama
from jquant.train.trainer import TrainConfig, plot_history, train

PRESET = "jq-llama-long"
ASSETS = Path(__file__).resolve().parents[1] / "packages" / "jquant-models" / "jquant_models"


def prepare(out: Path) -> None:
    from jquant.data import load_split, load_tokenizer
    from jquant.data.needle import needle_pieces
    from jquant.data.windows import token_stream

    tok = load_tokenizer()
    pieces = needle_pieces(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, train=token_stream(load_split("train"), tok), validation=token_stream(load_split("validation"), tok),
             key_lengths=np.array([len(k) for k in pieces.keys]), keys=np.concatenate(pieces.keys),
             space=pieces.space, digits=pieces.digits, period=pieces.period, special=np.array(tok.all_special_ids))


def _pieces(data) -> NeedlePieces:
    keys = tuple(np.split(data["keys"], np.cumsum(data["key_lengths"])[:-1]))
    return NeedlePieces(keys=keys, space=int(data["space"]), digits=data["digits"], period=int(data["period"]))


def alphabet_of(data, vocab_size: int) -> RecallAlphabet:
    """The recall alphabet (``jquant.data.recall``) of the tokenizer whose special ids ``prepare`` saved."""
    if "special" not in data:
        raise ValueError("the data file has no 'special' array (written before recall rows existed); run "
                         "`train_long_context.py prepare` again.")
    return recall_alphabet(vocab_size, exclude=tuple(int(i) for i in data["special"]))


def run_training(data_path: Path, workdir: Path, cfg: TrainConfig, needle_fraction: float, n_needles: int,
                 init: Path | None, task: str = "numbers") -> None:
    data = np.load(data_path)
    stream, pieces = data["train"], _pieces(data)
    model_cfg = llama.FAMILY.presets[PRESET].replace(dtype="bfloat16", param_dtype="float32")
    alphabet = alphabet_of(data, model_cfg.vocab_size) if task == "recall" else None

    def sample_batch(step: int) -> np.ndarray:
        rng = np.random.default_rng([cfg.seed, step])
        rows = []
        for _ in range(cfg.batch_size):
            if rng.random() < needle_fraction:
                if task == "recall":  # half the recall rows dense (block then queries), half spread over text
                    rows.append(recall_window(stream, alphabet, cfg.seq_len + 1, rng, n_pairs=n_needles,
                                              n_queries=n_needles, filler=bool(rng.random() < 0.5)))
                elif task in ("passages", "scrambled"):
                    rows.append(repeat_window(stream, cfg.seq_len + 1, rng, n_passages=n_needles,
                                              scrambled=task == "scrambled"))
                else:
                    rows.append(training_window(stream, pieces, cfg.seq_len + 1, rng, n_needles=n_needles))
            else:
                start = int(rng.integers(0, len(stream) - cfg.seq_len - 1))
                rows.append(stream[start:start + cfg.seq_len + 1])
        return np.stack(rows).astype(np.int32)

    model = llama.init_model(model_cfg, jax.random.key(cfg.seed)) if init is None else \
        llama.from_tensors(model_cfg, _load_shards(init), source=str(init))
    result = train(model, stream, data["validation"], cfg, workdir, sample_batch=sample_batch)
    _save_shards(workdir, llama.to_tensors(result.model))
    (workdir / "train_summary.json").write_text(json.dumps({
        "train_config": dataclasses.asdict(cfg), "needle_fraction": needle_fraction, "needles_per_row": n_needles, "task": task,
        "initialised_from": None if init is None else str(init),
        "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "train_seconds": round(result.seconds, 1),
        "final_train_loss": result.history[-1]["loss"], "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind)}, indent=2) + "\n")


SHARD_BYTES = 12 * 2**20  # the GPU machine returns files of at most 16 MiB


def _save_shards(workdir: Path, tensors: dict) -> None:
    """bfloat16 weights (as uint16 bit patterns) in ``params_<i>.npz`` files of at most ``SHARD_BYTES``."""
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        bits = np.asarray(value, ml_dtypes.bfloat16).view(np.uint16)
        if current and size + bits.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = bits, size + bits.nbytes
    shards.append(current)
    for i, shard in enumerate(shards):
        np.savez(workdir / f"params_{i}.npz", **shard)


def _load_shards(workdir: Path) -> dict:
    """The weights of an earlier run's ``params_*.npz``, or of a Hugging Face folder (e.g. the shipped model)."""
    if (workdir / "config.json").is_file():
        from jquant.models import hf_io

        return hf_io.read_safetensors(workdir)
    files = sorted(workdir.glob("params_*.npz"))
    if not files:
        raise FileNotFoundError(f"{workdir}: no params_*.npz; run the train step first.")
    return {k: v.view(ml_dtypes.bfloat16) for f in files for k, v in np.load(f).items()}


def export(workdir: Path) -> dict:
    from jquant.data import load_split, load_tokenizer
    from jquant.data.windows import token_windows
    from jquant.eval.perplexity import perplexity
    from jquant.models import hf_io

    summary = json.loads((workdir / "train_summary.json").read_text())
    tensors = _load_shards(workdir)
    cfg = llama.FAMILY.presets[PRESET].replace(dtype="float32", param_dtype="bfloat16")
    model = llama.from_tensors(cfg, tensors, source=str(workdir))
    tok = load_tokenizer()
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()] \
        if (workdir / "history.jsonl").is_file() else None
    if history:
        plot_history(history, workdir / "loss_curve.png", title=f"{PRESET}: training")
    t0 = time.perf_counter()
    val = load_split("validation")
    ppl256 = perplexity(model, token_windows(val, tok, 256), progress=False)
    ppl4k = perplexity(model, token_windows(val, tok, 4096, max_windows=8), progress=False, batch_size=1)
    summary.update({
        "preset": PRESET,
        "parameters": int(sum(x.size for x in tensors.values())),
        "validation_ppl": ppl256.ppl, "validation_tokens": ppl256.n_tokens, "validation_seq_len": 256,
        "validation_ppl_4096": ppl4k.ppl, "validation_tokens_4096": ppl4k.n_tokens,
        "eval_seconds": round(time.perf_counter() - t0, 1), "weights_dtype": "bfloat16",
    })

    def extra(folder: Path) -> None:
        tok.save_pretrained(folder)
        (folder / "reference_info.json").write_text(json.dumps(summary, indent=2) + "\n")
        if (workdir / "loss_curve.png").is_file():
            (folder / "loss_curve.png").write_bytes((workdir / "loss_curve.png").read_bytes())

    hf_io.write_checkpoint(ASSETS / PRESET, llama.config_to_hf(model.config), llama.to_tensors(model), extra_files=extra,
                             overwrite=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--workdir", type=Path, required=True)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--peak-lr", type=float, default=2e-3)
    t.add_argument("--warmup-steps", type=int, default=60)
    t.add_argument("--needle-fraction", type=float, default=0.5)
    t.add_argument("--needles-per-row", type=int, default=1)
    t.add_argument("--task", choices=("numbers", "passages", "scrambled", "recall"), default="numbers",
                   help="rows with secret-number needles and their questions, with repeated passages, with "
                        "repeated runs of independently drawn tokens (only copying predicts them), or with "
                        "associative-recall blocks of --needles-per-row key-value pairs and as many queries")
    t.add_argument("--init", type=Path, default=None, help="continue from an earlier run's params_*.npz or a Hugging Face folder")
    e = sub.add_parser("export")
    e.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "train":
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, peak_lr=args.peak_lr,
                          warmup_steps=args.warmup_steps, checkpoint_every=100, eval_every=50, eval_windows=8)
        run_training(args.data, args.workdir, cfg, args.needle_fraction, args.needles_per_row, args.init, args.task)
    else:
        print(json.dumps(export(args.workdir), indent=2))


if __name__ == "__main__":
    main()
