"""Train jquant's reference models on the bundled corpus and export them into packages/jquant-models/jquant_models/.

    python experiments/train_reference_models.py --preset jq-llama-tiny --steps 800
    python experiments/train_reference_models.py --preset jq-llama-small --steps 1100
    python experiments/train_reference_models.py --preset jq-mamba-small --steps 500 --warmup-steps 50
    python experiments/train_reference_models.py --preset jq-rwkv6-small --steps 500 --warmup-steps 50
    python experiments/train_reference_models.py --preset jq-llama-small --steps 1300 --peak-lr 6e-3 \
        --weight-decay 0 --name jq-llama-small-hot          # the outlier-bearing one (outlier_recipes.md)

Interrupted runs resume from ``runs/<name>/checkpoints`` (``--name`` defaults to the preset). The validation
perplexity of the exported (bf16) weights is written to
``packages/jquant-models/jquant_models/<preset>/reference_info.json``.
"""

import argparse
from pathlib import Path

from jquant.train import TrainConfig
from jquant.train.reference import train_reference

ASSETS = Path(__file__).resolve().parents[1] / "packages" / "jquant-models" / "jquant_models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--peak-lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--name", default=None, help="the exported model's name (default: the preset)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, peak_lr=args.peak_lr,
                      warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, checkpoint_every=50,
                      eval_every=100)
    name = args.name or args.preset
    workdir = args.workdir or Path("runs") / name
    summary = train_reference(args.preset, cfg, workdir, export_to=ASSETS / name,
                              overwrite_export=True)
    print(summary)


if __name__ == "__main__":
    main()
