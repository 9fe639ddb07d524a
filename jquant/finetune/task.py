"""An offline instruction-like fine-tuning task: name the source of a short excerpt.

Items are the zero-shot ``source`` task (``jquant.eval.zeroshot.build_source``): an
excerpt of whole lines within ``context_chars`` characters, then ``"\\nThis passage is
from"``, answered by ``" Shakespeare"``, ``" Milton"`` or ``" the Bible"``. The
reference models never see these labels in pre-training, so they start near chance;
fine-tuning on items from the train split teaches the mapping, and accuracy is measured
on items from the test split (passages the model never trained on).

``supervised_rows`` turns items into training rows: ``<|eos|> + context + answer``,
right-padded, with a loss mask on the positions that predict the answer tokens only
(spec §3.6 step 3.2: the loss is on the response).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from jquant.data.corpus import load_split
from jquant.eval.zeroshot import MultipleChoiceItem, build_source, encode_pair

DEFAULT_CONTEXT_CHARS = 160


def source_items(splits: str | Sequence[str], n_items: int, seed: int, *,
                 context_chars: int = DEFAULT_CONTEXT_CHARS) -> list[MultipleChoiceItem]:
    """``n_items`` source-attribution items from the passages of one or more corpus splits, balanced over
    the three sources (held-out items may pool ``("validation", "test")``: Milton has 138 passages in the two).
    """
    import datasets

    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if "train" in splits and len(splits) > 1:
        raise ValueError(f"source_items: do not pool the train split with held-out splits, got {splits}.")
    return build_source(datasets.concatenate_datasets([load_split(s) for s in splits]), n_items, seed,
                        context_chars=context_chars)


def supervised_rows(items: Sequence[MultipleChoiceItem], tokenizer: PreTrainedTokenizerBase,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows for ``items`` with their correct answers.

    Returns ``tokens`` int32 ``[N, seq_len + 1]`` (pad-filled) and ``mask`` bool
    ``[N, seq_len]``, where ``mask[i, t]`` marks that ``tokens[i, t + 1]`` is an answer
    token (the target of position t). Contexts are left-truncated to fit.
    """
    if seq_len < 2:
        raise ValueError(f"supervised_rows: seq_len={seq_len} must be at least 2.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = np.full((len(items), seq_len + 1), pad, np.int32)
    mask = np.zeros((len(items), seq_len), bool)
    for row, item in enumerate(items):
        ctx, answer = encode_pair(tokenizer, item.context, item.choices[item.label], seq_len + 1)
        tokens[row, :len(ctx) + len(answer)] = ctx + answer
        mask[row, len(ctx) - 1:len(ctx) - 1 + len(answer)] = True
    return tokens, mask
