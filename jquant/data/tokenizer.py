"""Byte-level BPE tokenizer trained on the corpus train split.

::

    python -m jquant.data.tokenizer train --corpus jquant/assets/corpus \\
        --vocab-size 4096 --out jquant/assets/tokenizer

The tokenizer has no normalizer and no post-processor: ``encode`` adds no special
tokens and ``decode(encode(text)) == text`` for any string. Special tokens
``<|bos|>``, ``<|eos|>``, ``<|pad|>`` get ids 0, 1, 2. Training is deterministic
(same corpus and vocabulary size give the same files).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jquant.data.corpus import DEFAULT_CORPUS_DIR, load_split

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
TRAIN_INFO = "train_info.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` with :data:`SPECIAL_TOKENS` at ids 0..2."""
    n_min = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= n_min:
        raise ValueError(f"vocab_size={vocab_size} must exceed {n_min} "
                         "(256 byte symbols + 3 special tokens); use e.g. 4096.")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def bytes_per_token(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> float:
    """UTF-8 bytes of ``texts`` divided by their token count (no special tokens)."""
    n_tokens = sum(map(len, tokenizer(list(texts), add_special_tokens=False)["input_ids"]))
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens


def train_from_corpus(corpus_dir: Path, vocab_size: int, out_dir: Path) -> dict:
    """Train on the ``train`` split of ``corpus_dir``, save to ``out_dir``; return stats.

    Saves the Hugging Face files plus ``train_info.json`` (vocabulary size and
    bytes/token on the validation split).
    """
    tokenizer = train_tokenizer(load_split("train", corpus_dir)["text"], vocab_size)
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "vocab_size": len(tokenizer),
        "special_tokens": {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS},
        "trained_on": "train split of the jquant corpus",
        "validation_bytes_per_token": round(
            bytes_per_token(tokenizer, load_split("validation", corpus_dir)["text"]), 4),
    }
    (out_dir / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_tokenizer(path: Path | str | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_from_corpus` (default: the bundled one)."""
    path = Path(path or DEFAULT_TOKENIZER_DIR)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"No tokenizer.json in {path}. Train one with `python -m jquant.data.tokenizer "
            f"train --corpus {DEFAULT_CORPUS_DIR} --vocab-size 4096 --out {path}`.")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        raise ValueError(f"the tokenizer in {path} could not be read ({err}): tokenizer.json or a file beside it is "
                         "damaged; copy the tokenizer files again or pass another tokenizer folder.") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jquant.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on the train split")
    train.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR, help="corpus folder")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")
    train.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_DIR, help="output folder")
    args = parser.parse_args(argv)
    info = train_from_corpus(args.corpus, args.vocab_size, args.out)
    print(f"saved tokenizer to {args.out}: {json.dumps(info)}")


if __name__ == "__main__":
    main()
