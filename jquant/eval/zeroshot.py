"""Zero-shot multiple choice scored by log-likelihood, with tasks built from the corpus.

Scoring: each (context, choice) pair is encoded as ``<|eos|> + context`` followed
by ``choice`` (encoded separately, so put any separating space at the start of
the choice; ``<|eos|>`` is what precedes every passage in the training stream,
see :mod:`jquant.data.windows`). A choice's score is the sum of the log-probs of
its tokens; ``accuracy`` picks the highest sum, ``acc_norm`` the highest mean
per token. Ties go to the lowest choice index (``np.argmax``), so a model with
uniform logits gets ``acc_norm`` = fraction of items whose label is 0, and
``accuracy`` = fraction whose label is the first of the choices with fewest tokens.

Tasks (``TASKS``), each ``build(split_dataset, n_items, seed) -> list[MultipleChoiceItem]``,
deterministic for a seed, items spread evenly over the sources, labels balanced:

* ``next_line``: a few lines of a passage; pick its true next line among 4
  (3 distractors: lines of other passages of the same source, nearest in length).
* ``source``: a passage excerpt + ``"\\nThis passage is from"``; pick
  ``" Shakespeare"``, ``" Milton"`` or ``" the Bible"``. A model trained only on
  this corpus never sees such labels, so expect near chance; it is a probe of
  label knowledge for pretrained models.
* ``same_source``: the in-distribution version of ``source``: an excerpt, then
  ``<|eos|>``; pick the opening of another passage from the same source among
  openings from each of the three sources (nearest in length). Training windows
  join consecutive passages of one work with ``<|eos|>``, so a model that knows the
  sources' styles prefers the same-source opening.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from jquant.data.corpus import SOURCES, load_split
from jquant.data.tokenizer import EOS

if TYPE_CHECKING:
    import datasets
from jquant.eval.perplexity import LogitsFn, target_logprobs

LENGTH_BUCKET = 16  # sequences are right-padded to a multiple of this many tokens
SOURCE_CHOICES = {"shakespeare": " Shakespeare", "milton": " Milton", "bible": " the Bible"}
SOURCE_PROMPT = "\nThis passage is from"
NEXT_LINE_CHOICES = 4
LINE_CHARS = (20, 240)  # next_line answers and distractors: min/max characters
CONTEXT_CHARS = 400  # excerpt / context budget, whole lines
OPENING_CHARS = 120  # same_source choices, whole lines


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A context, its candidate continuations and the index of the correct one."""

    context: str
    choices: list[str]
    label: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"choices must hold at least 2 strings, got {self.choices!r}.")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label={self.label} out of range for {len(self.choices)} choices.")
        if any(not c for c in self.choices):
            raise ValueError(f"every choice must be a non-empty string, got {self.choices!r}.")


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Accuracies over ``n`` items; ``acc_norm`` is None when ``normalize="none"``."""

    accuracy: float
    acc_norm: float | None
    n: int


# ---------------------------------------------------------------------- scoring


def choice_scores(model: LogitsFn, tokenizer: PreTrainedTokenizerBase,
                  items: Sequence[MultipleChoiceItem], *, batch_size: int = 8,
                  max_len: int | None = None, progress: bool = False
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item: (summed log-prob float64 ``[n_choices]``, token count int ``[n_choices]``).

    All pairs are right-padded to one length (rounded up to a multiple of
    ``LENGTH_BUCKET``) and scored in fixed-size batches; the model must be causal.
    ``max_len`` left-truncates contexts so each pair fits in ``max_len`` tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; use jquant.data.tokenizer.load_tokenizer().")
    pairs = [encode_pair(tokenizer, item.context, choice, max_len)
             for item in items for choice in item.choices]
    if not pairs:
        return []
    length = -(-max(len(c) + len(x) for c, x in pairs) // LENGTH_BUCKET) * LENGTH_BUCKET
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = np.full((len(pairs), length), pad, dtype=np.int32)
    mask = np.zeros((len(pairs), length - 1), dtype=bool)
    for row, (ctx, choice) in enumerate(pairs):
        tokens[row, :len(ctx) + len(choice)] = ctx + choice
        mask[row, len(ctx) - 1:len(ctx) - 1 + len(choice)] = True  # positions predicting choice
    logp = target_logprobs(model, tokens, batch_size=batch_size, progress=progress,
                           desc="multiple choice")
    sums = np.where(mask, logp.astype(np.float64), 0.0).sum(axis=1)
    counts = mask.sum(axis=1)
    bounds = np.cumsum([0] + [len(item.choices) for item in items])
    return [(sums[a:b], counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, choice: str,
                max_len: int | None) -> tuple[list[int], list[int]]:
    """Token ids of ``<|eos|> + context`` and of ``choice``, the context left-truncated to fit ``max_len``."""
    ctx = [tokenizer.eos_token_id] + tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(choice, add_special_tokens=False)
    if max_len is not None:
        if len(cont) >= max_len:
            raise ValueError(f"choice {choice[:40]!r}... has {len(cont)} tokens, which does not "
                             f"fit max_len={max_len} with a context; raise max_len.")
        ctx = ctx[max(0, len(ctx) + len(cont) - max_len):]
    return ctx, cont


def evaluate_multiple_choice(model: LogitsFn, tokenizer: PreTrainedTokenizerBase,
                             items: Sequence[MultipleChoiceItem], *,
                             normalize: Literal["token", "none"] = "token", batch_size: int = 8,
                             max_len: int | None = None, progress: bool = True
                             ) -> MultipleChoiceResult:
    """Accuracy (and per-token-normalised ``acc_norm`` unless ``normalize="none"``)."""
    if normalize not in ("token", "none"):
        raise ValueError(f"normalize must be 'token' or 'none', got {normalize!r}.")
    if not items:
        raise ValueError("items is empty; build some with TASKS[name](dataset, n_items, seed).")
    scores = choice_scores(model, tokenizer, items, batch_size=batch_size, max_len=max_len,
                           progress=progress)
    labels = np.array([item.label for item in items])
    accuracy = float(np.mean(np.array([np.argmax(s) for s, _ in scores]) == labels))
    acc_norm = None
    if normalize == "token":
        acc_norm = float(np.mean(np.array([np.argmax(s / n) for s, n in scores]) == labels))
    return MultipleChoiceResult(accuracy=accuracy, acc_norm=acc_norm, n=len(items))


# ------------------------------------------------------------------------ tasks


def _per_source(dataset: datasets.Dataset) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for text, source in zip(dataset["text"], dataset["source"]):
        groups.setdefault(source, []).append(text)
    return {s: groups[s] for s in SOURCES if s in groups}


def _quota(n_items: int, sources: Sequence[str]) -> dict[str, int]:
    """Split ``n_items`` over ``sources`` as evenly as possible (earlier ones get the rest)."""
    if n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items}.")
    k = len(sources)
    return {s: n_items // k + (i < n_items % k) for i, s in enumerate(sources)}


def _take(available: int, wanted: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if wanted > available:
        raise ValueError(f"n_items asks for {wanted} {what} but the split has {available}; "
                         "lower n_items or use a larger split.")
    return rng.choice(available, wanted, replace=False)


def _head(lines: Sequence[str], max_chars: int) -> str:
    """Leading whole lines within ``max_chars`` (at least the first line)."""
    kept, total = [], 0
    for line in lines:
        if kept and total + len(line) + 1 > max_chars:
            break
        kept.append(line)
        total += len(line) + 1
    return "\n".join(kept)


def _tail(lines: Sequence[str], max_chars: int) -> str:
    """Trailing whole lines within ``max_chars`` (at least 2 non-empty lines)."""
    kept: list[str] = []
    total = 0
    for line in reversed(lines):
        if sum(map(bool, kept)) >= 2 and total + len(line) + 1 > max_chars:
            break
        kept.append(line)
        total += len(line) + 1
    return "\n".join(reversed(kept)).lstrip("\n")


def _with_label(answer: str, distractors: list[str], label: int) -> list[str]:
    return distractors[:label] + [answer] + distractors[label:]


def _balanced_labels(n: int, n_choices: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_choices)


class _LengthPool:
    """Strings of one source sorted by length, for nearest-length distractors."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:  # (text, passage id)
        self.entries = sorted(entries, key=lambda e: (len(e[0]), e[0], e[1]))
        self.lengths = [len(text) for text, _ in self.entries]

    def pick(self, answer: str, k: int, exclude_passage: int, rng: np.random.Generator,
             window: int = 32) -> list[str]:
        """``k`` distinct strings near ``len(answer)``, none equal to it or from its passage."""
        center = bisect.bisect_left(self.lengths, len(answer))
        while True:
            lo, hi = max(0, center - window), center + window
            picked: list[str] = []
            for i in rng.permutation(np.arange(lo, min(hi, len(self.entries)))):
                text, passage = self.entries[i]
                if passage != exclude_passage and text != answer and text not in picked:
                    picked.append(text)
                    if len(picked) == k:
                        return picked
            if lo == 0 and hi >= len(self.entries):
                raise ValueError(f"not enough distinct distractors for {answer[:40]!r}.")
            window *= 2


def build_next_line(dataset: datasets.Dataset, n_items: int, seed: int) -> list[MultipleChoiceItem]:
    """Given a passage's lines up to line j, pick line j among 4 (see module docstring)."""
    rng = np.random.default_rng(seed)
    groups = _per_source(dataset)
    items: list[tuple[str, str, list[str]]] = []
    for source, wanted in _quota(n_items, list(groups)).items():
        passages = [text.split("\n") for text in groups[source]]
        eligible = [(p, j) for p, lines in enumerate(passages) for j, line in enumerate(lines)
                    if LINE_CHARS[0] <= len(line) <= LINE_CHARS[1]
                    and sum(map(bool, lines[:j])) >= 2]
        pool = _LengthPool([(passages[p][j], p) for p, j in eligible])
        for i in _take(len(eligible), wanted, rng, f"{source} lines"):
            p, j = eligible[i]
            answer = passages[p][j]
            context = _tail(passages[p][:j], CONTEXT_CHARS) + "\n"
            items.append((context, answer, pool.pick(answer, NEXT_LINE_CHOICES - 1, p, rng)))
    labels = _balanced_labels(len(items), NEXT_LINE_CHOICES, rng)
    return [MultipleChoiceItem(ctx, _with_label(ans, dis, int(lab)), int(lab))
            for (ctx, ans, dis), lab in zip(items, labels)]


def build_source(dataset: datasets.Dataset, n_items: int, seed: int, *,
                 context_chars: int = CONTEXT_CHARS) -> list[MultipleChoiceItem]:
    """Excerpt (leading whole lines within ``context_chars``) + "This passage is from"; choices
    name the three sources (label = source)."""
    rng = np.random.default_rng(seed)
    groups = _per_source(dataset)
    if set(groups) != set(SOURCES):
        raise ValueError(f"the source task needs passages of all of {SOURCES}; "
                         f"the split has {sorted(groups)}.")
    choices = [SOURCE_CHOICES[s] for s in SOURCES]
    items = []
    for source, wanted in _quota(n_items, SOURCES).items():
        for i in _take(len(groups[source]), wanted, rng, f"{source} passages"):
            excerpt = _head(groups[source][i].split("\n"), context_chars)
            items.append(MultipleChoiceItem(excerpt + SOURCE_PROMPT, choices,
                                            SOURCES.index(source)))
    return [items[i] for i in rng.permutation(len(items))]


def build_same_source(dataset: datasets.Dataset, n_items: int, seed: int
                      ) -> list[MultipleChoiceItem]:
    """Excerpt + eos; pick the same-source passage opening among one per source."""
    rng = np.random.default_rng(seed)
    groups = _per_source(dataset)
    if set(groups) != set(SOURCES):
        raise ValueError(f"the same_source task needs passages of all of {SOURCES}; "
                         f"the split has {sorted(groups)}.")
    openings = {s: [_head(t.split("\n"), OPENING_CHARS) for t in texts]
                for s, texts in groups.items()}
    pools = {s: _LengthPool([(o, p) for p, o in enumerate(texts)]) for s, texts in openings.items()}
    items = []
    for source, wanted in _quota(n_items, SOURCES).items():
        texts = groups[source]
        for i in _take(len(texts), wanted, rng, f"{source} passages"):
            j = (i + 1 + rng.integers(len(texts) - 1)) % len(texts)  # another passage
            answer = openings[source][j]
            others = [pools[s].pick(answer, 1, -1, rng)[0] for s in SOURCES if s != source]
            context = _head(texts[i].split("\n"), CONTEXT_CHARS) + EOS
            items.append((context, answer, others))
    labels = _balanced_labels(len(items), len(SOURCES), rng)
    order = rng.permutation(len(items))
    return [MultipleChoiceItem(items[k][0], _with_label(items[k][1], items[k][2], int(lab)),
                               int(lab)) for k, lab in zip(order, labels)]


TaskBuilder = Callable[["datasets.Dataset", int, int], list[MultipleChoiceItem]]
TASKS: dict[str, TaskBuilder] = {
    "next_line": build_next_line,
    "source": build_source,
    "same_source": build_same_source,
}


def zero_shot(model: LogitsFn, tokenizer: PreTrainedTokenizerBase,
              tasks: Sequence[str] = ("next_line", "source"), n_items: int = 200, seed: int = 0,
              *, split: str = "test", batch_size: int = 8, max_len: int | None = None,
              progress: bool = True) -> dict[str, MultipleChoiceResult]:
    """Build each task from a bundled corpus split and evaluate ``model`` on it."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {', '.join(TASKS)}.")
    dataset = load_split(split)
    return {task: evaluate_multiple_choice(model, tokenizer, TASKS[task](dataset, n_items, seed),
                                           batch_size=batch_size, max_len=max_len,
                                           progress=progress)
            for task in tasks}
