"""Does a small Llama learn multi-query associative recall, and in how many steps? -> experiments/results/recall_probe.md

    python experiments/recall_probe.py --steps 4000                    # the CPU probe (~60 min on 2 busy cores)
    python experiments/recall_probe.py --steps 20000 --lr 1e-3 3e-3 1e-2 --layers 2 4   # a sweep, for a GPU
    python experiments/recall_probe.py --report-only
    python experiments/recall_probe.py --quick --out /tmp/r            # smoke run

Issue 34 item 6 needs a long-context reference model that retrieves, and every attempt to teach jq-llama-long
retrieval stopped at an exact-answer accuracy near 0 (``train_long_context.py``'s docstring). This probe asks the
question underneath on the smallest case, dense MQAR rows (Arora et al. 2023, "Zoology"): ``--pairs`` one-token keys
each followed by a one-token value (``jquant.data.recall``), then queries of those keys (``recall_window`` with
``filler=False``), the rest of the row random tokens outside the alphabet. The loss is on the queries' values only.
A model that has only learned "the answer is one of the block's values" scores about ``1 / pairs`` (the plateau
level in the table); the lookup itself (an induction-style head) shows as accuracy climbing towards 1.

Each configuration trains a randomly initialised ``jquant.models.llama`` from ``--seed`` (AdamW, warmup then cosine
decay to a tenth, gradient clip 1) and records the teacher-forced accuracy on the query values of ``EVAL_ROWS``
held-out rows every ``--eval-every`` steps.
"""

import argparse
import time
from typing import Any

import harness
from harness import Column, Results

EVAL_ROWS = 128
VOCAB = 4096  # the bundled tokenizer's size, so a configuration that learns here transfers to the reference models
LEARNED = 0.9  # held-out accuracy at which the lookup counts as learned


def _rows(rng, alphabet, n: int, length: int, pairs: int):
    """``(tokens [n, length + 1], mask [n, length])``: dense recall rows, mask 1 where the next token is a value."""
    import numpy as np

    from jquant.data.recall import recall_window

    pool = np.setdiff1d(np.arange(2, VOCAB), np.concatenate([alphabet.keys, alphabet.values]))
    stream = rng.choice(pool, size=4 * (length + 1))
    tokens = np.stack([recall_window(stream, alphabet, length + 1, rng, n_pairs=pairs, n_queries=pairs,
                                     filler=False) for _ in range(n)])
    mask = np.zeros((n, length), np.float32)
    mask[:, 2 * pairs + 2 * np.arange(pairs)] = 1.0  # input position of each query's key: it predicts the value
    return tokens, mask


def train_probe(args: argparse.Namespace, layers: int, lr: float) -> dict[str, Any]:
    """One configuration: train, and the held-out accuracy curve."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jquant.data.recall import recall_alphabet
    from jquant.models.llama import LlamaConfig, init_model

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.width, intermediate_size=2 * args.width, num_layers=layers,
                      num_heads=args.heads, num_kv_heads=args.heads, max_position_embeddings=max(args.length, 64),
                      bos_token_id=0, eos_token_id=1)
    model = init_model(cfg, jax.random.key(args.seed))
    alphabet = recall_alphabet(VOCAB, exclude=(0, 1), n_keys=args.alphabet, n_values=args.alphabet, seed=args.seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, args.steps // 10 + 1), args.steps, lr * 0.1)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)),
                              wrt=nnx.Param)

    def masked(m, tokens, mask):
        logits = m(tokens[:, :-1]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        hits = (logits.argmax(-1) == tokens[:, 1:]) * mask
        return (nll * mask).sum() / mask.sum(), hits.sum() / mask.sum()

    @nnx.jit
    def step(m, opt, tokens, mask):
        (loss, _), grads = nnx.value_and_grad(masked, has_aux=True)(m, tokens, mask)
        opt.update(m, grads)
        return loss

    evaluate = nnx.jit(masked)
    held_out = [jnp.asarray(a) for a in _rows(np.random.default_rng([args.seed, 1]), alphabet, EVAL_ROWS,
                                                args.length, args.pairs)]
    train_rng = np.random.default_rng([args.seed, 0])
    curve, start = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        step(model, optimizer, *map(jnp.asarray, _rows(train_rng, alphabet, args.batch, args.length, args.pairs)))
        if i % args.eval_every == 0 or i == args.steps:
            loss, accuracy = evaluate(model, *held_out)
            curve.append((i, float(loss), float(accuracy)))
            if not args.quiet:
                print(f"layers {layers} lr {lr:g} step {i}: held-out loss {float(loss):.3f} accuracy "
                      f"{float(accuracy):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    learned_at = next((s for s, _, a in curve if a >= LEARNED), None)
    return {"layers": layers, "width": args.width, "heads": args.heads, "lr": lr, "pairs": args.pairs,
            "alphabet": args.alphabet, "length": args.length, "batch": args.batch, "steps": args.steps,
            "seed": args.seed, "accuracy": curve[-1][2], "best_accuracy": max(a for _, _, a in curve),
            "loss": curve[-1][1], "plateau": 1.0 / args.pairs, "learned_at": learned_at, "curve": curve,
            "seconds": time.perf_counter() - start, "backend": jax.default_backend()}


KEY = ("layers", "width", "heads", "lr", "pairs", "alphabet", "length", "batch", "steps", "seed")


def run(args: argparse.Namespace, results: Results) -> None:
    for layers in args.layers:
        for lr in args.lr:
            setting = {k: getattr(args, k) for k in KEY} | {"layers": layers, "lr": lr}
            if not results.has(**setting):
                results.add(train_probe(args, layers, lr))


def report(runs: list[Results], base) -> None:
    rows = [r for res in runs for r in res.rows]
    columns = [Column("layers", "layers"), Column("width", "width"), Column("lr", "lr", "g"),
               Column("pairs", "pairs"), Column("alphabet", "alphabet"), Column("batch", "batch"),
               Column("steps", "steps"), Column("seed", "seed"), Column("plateau (1/pairs)", "plateau", ".3f"),
               Column("held-out accuracy", "accuracy", ".3f"), Column("best", "best_accuracy", ".3f"),
               Column(f"first step at >= {LEARNED:g}", "learned_at"), Column("backend", "backend"),
               Column("minutes", lambda r: r["seconds"] / 60, ".1f")]
    lines = ["# Multi-query associative recall: does a small Llama learn the lookup?", "",
             harness.reproduce(runs[0].command), "",
             f"Dense MQAR rows, teacher-forced accuracy on the query values of {EVAL_ROWS} held-out rows (module "
             "docstring of `experiments/recall_probe.py`).", "", *harness.table(rows, columns), ""]
    if rows:
        fig, axes = harness.figure()
        ax = axes[0, 0]
        for r in rows:
            ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]],
                    label=f"{r['layers']} layers, lr {r['lr']:g}, seed {r['seed']}")
        ax.axhline(rows[0]["plateau"], color="grey", linestyle=":", label="1 / pairs")
        ax.set(xlabel="step", ylabel="held-out value accuracy", ylim=(0, 1))
        ax.legend(fontsize=7)
        harness.save_figure(fig, base.with_suffix(".png"))
        lines += [f"![accuracy curves]({base.with_suffix('.png').name})", "", "## Reading", "",
                  harness.verdict(reading(rows)), ""]
    harness.write_text_atomic(base.with_suffix(".md"), "\n".join(lines))


def reading(rows: list[dict[str, Any]]) -> str:
    """Whether any configuration learned the lookup, from the rows."""
    learned = [r for r in rows if r["learned_at"] is not None]
    best = max(rows, key=lambda r: r["best_accuracy"])
    if learned:
        first = min(learned, key=lambda r: r["learned_at"])
        return (f"learned: {len(learned)} of {len(rows)} configurations reach {LEARNED:g} held-out accuracy, the "
                f"fastest ({first['layers']} layers, lr {first['lr']:g}) at step {first['learned_at']}.")
    return (f"not learned: no configuration reaches {LEARNED:g} held-out accuracy; the best, {best['layers']} layers "
            f"at lr {best['lr']:g}, reaches {best['best_accuracy']:.3f} in {best['steps']} steps against the "
            f"{best['plateau']:.3f} of knowing only that the answer is one of the block's values.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per row (each is queried once)")
    parser.add_argument("--alphabet", type=int, default=64, help="how many distinct keys (and values) rows draw from")
    parser.add_argument("--length", type=int, default=64, help="tokens per row")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    harness.add_arguments(parser)
    harness.run_experiment(parser, stem=lambda a: "recall_probe", key=KEY, run=run, report=report,
                           quick={"steps": 4, "eval_every": 2}, volatile=("quiet", "eval_every", "layers", "lr"))


if __name__ == "__main__":
    main()
