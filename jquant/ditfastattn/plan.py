"""DiTFastAttnV2's attention plan: per step, layer and head, which attention to run (spec §3.1, §3.4).

A plan is the pytree ``AttentionPlan(windows [T, L, H] int32, residual [T, L, H] int8)`` plus its static layout
(``n_image`` image tokens, ``n_text`` text tokens starting at ``text_start`` in the joint sequence, ``pattern``):

- ``windows[t, l, h] = FULL (-1)``: full attention;
- ``= REUSE (0)``: the head's output (before the output projection) is the same head's output at step ``t - 1``
  *as produced under the plan* (spec §7.4);
- ``= w >= 1``: local attention of half-width ``w`` over the image tokens: with ``pattern="arrow"`` (V2) the text
  rows and columns stay dense (``jquant.ops.mask.Arrow``), with ``pattern="band"`` (V1's window attention) the
  band covers the whole joint sequence and text is not special (``jquant.ops.mask.Band``).

``residual`` carries DiTFastAttn V1's window attention with residual sharing (WA-RS): ``REFRESH (2)`` runs full
attention, outputs it and caches ``r = O_full - O_window``; ``ADD (1)`` outputs ``O_window + r`` with the cached
``r``; ``NONE (0)`` is plain. V2's plans use ``NONE`` throughout.

Attention cost is counted from the plan (``attention_pairs``): the number of (query, key) pairs each head scores,
``4 D`` FLOPs each (``q k^T`` and ``p v``), the same for every batch row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

FULL, REUSE = -1, 0
NONE, ADD, REFRESH = 0, 1, 2
PATTERNS = ("arrow", "band")
PLAN_FILE = "attention_plan.json"
PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class JointLayout:
    """Where the text sits in a joint attention sequence of ``n_image + n_text`` tokens: ``[text_start,
    text_start + n_text)`` (SD3 puts it after the image, ``text_start = n_image``; Flux before, ``0``)."""

    n_image: int
    n_text: int
    text_start: int

    def __post_init__(self):
        for name in ("n_image", "n_text", "text_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"JointLayout: {name}={value!r} must be a non-negative int.")
        if self.n_image < 1:
            raise ValueError("JointLayout: n_image must be at least 1 (the image tokens the windows slide over).")
        if self.text_start not in (0, self.n_image):
            raise ValueError(f"JointLayout: text_start={self.text_start} must be 0 (text first, Flux) or n_image="
                             f"{self.n_image} (text last, SD3).")

    @property
    def length(self) -> int:
        return self.n_image + self.n_text

    @property
    def image_start(self) -> int:
        return self.n_text if self.text_start == 0 else 0


def arrow_pairs(layout: JointLayout, half_width: int) -> int:
    """Allowed pairs of ``Arrow(n_text, half_width)``: text rows see all ``S`` keys, image rows the ``n_text`` text
    keys plus their band over the image, ``sum_i |[i - w, i + w] ∩ [0, n_image)|``."""
    n, w = layout.n_image, min(int(half_width), layout.n_image - 1)
    band = n * (2 * w + 1) - w * (w + 1)
    return layout.n_text * layout.length + n * layout.n_text + band


def band_pairs(layout: JointLayout, half_width: int) -> int:
    """Allowed pairs of ``Band(half_width)`` over the whole joint sequence of ``S`` tokens."""
    s, w = layout.length, min(int(half_width), layout.length - 1)
    return s * (2 * w + 1) - w * (w + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The plan of the module docstring. ``windows`` / ``residual`` are the pytree's leaves (numpy when built,
    traced when threaded through a jitted sampler); the layout, ``pattern`` and ``info`` (how it was made) are
    static."""

    windows: np.ndarray
    residual: np.ndarray
    layout: JointLayout = dataclasses.field(metadata=dict(static=True))
    pattern: str = dataclasses.field(default="arrow", metadata=dict(static=True))
    info: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @classmethod
    def full(cls, steps: int, layers: int, heads: int, layout: JointLayout, **info) -> AttentionPlan:
        """No compression: every head full at every step."""
        return cls.build(np.full((steps, layers, heads), FULL, np.int32), layout, **info)

    @classmethod
    def build(cls, windows: np.ndarray, layout: JointLayout, *, residual: np.ndarray | None = None,
              pattern: str = "arrow", **info) -> AttentionPlan:
        """A validated plan from numpy ``windows [T, L, H]`` (and ``residual``); ``info`` is recorded with it."""
        windows = np.asarray(windows, np.int32)
        residual = np.zeros(windows.shape, np.int8) if residual is None else np.asarray(residual, np.int8)
        info = {k: tuple(v) if isinstance(v, list) else v for k, v in info.items()}  # static fields hash
        plan = cls(windows, residual, layout, pattern, tuple(sorted(info.items())))
        plan.validate()
        return plan

    @property
    def steps(self) -> int:
        return int(np.shape(self.windows)[0])

    @property
    def layers(self) -> int:
        return int(np.shape(self.windows)[1])

    @property
    def heads(self) -> int:
        return int(np.shape(self.windows)[2])

    def validate(self) -> None:
        """Clear errors for a plan that cannot run (numpy leaves only)."""
        w, r = np.asarray(self.windows), np.asarray(self.residual)
        if w.ndim != 3 or r.shape != w.shape:
            raise ValueError(f"AttentionPlan: windows must be [steps, layers, heads] and residual the same shape, got "
                             f"{w.shape} and {r.shape}.")
        if self.pattern not in PATTERNS:
            raise ValueError(f"AttentionPlan: pattern={self.pattern!r} is not one of {PATTERNS}.")
        if np.any(w < FULL):
            raise ValueError(f"AttentionPlan: windows hold {int(w.min())}; use {FULL} (full), {REUSE} (reuse the "
                             "previous step's output) or a half-width >= 1.")
        limit = self.layout.n_image if self.pattern == "arrow" else self.layout.length
        if np.any(w > limit):
            raise ValueError(f"AttentionPlan: a window half-width of {int(w.max())} is larger than the sequence it "
                             f"slides over ({limit} tokens); use {FULL} for full attention.")
        if np.any(w[0] == REUSE):
            raise ValueError("AttentionPlan: step 0 reuses a previous output but there is none; step 0 must compute.")
        if not np.isin(r, (NONE, ADD, REFRESH)).all():
            raise ValueError("AttentionPlan: residual entries must be 0 (none), 1 (add cached) or 2 (refresh).")
        if np.any((r != NONE) & (w < 1)):
            raise ValueError("AttentionPlan: residual sharing needs a window >= 1 at the same step, layer and head.")
        refreshed = np.zeros(w.shape[1:], bool)
        for t in range(w.shape[0]):
            if np.any((r[t] == ADD) & ~refreshed):
                raise ValueError(f"AttentionPlan: step {t} adds a cached residual that no earlier step refreshed.")
            refreshed |= r[t] == REFRESH

    def check_model(self, *, steps: int, layers: int, heads: int, layout: JointLayout) -> None:
        """Errors when the plan was made for another number of steps, layers, heads or token layout."""
        for name, mine, theirs in (("steps", self.steps, steps), ("layers", self.layers, layers),
                                   ("heads", self.heads, heads)):
            if mine != theirs:
                hint = f"sample with {mine} steps or " if name == "steps" else ""
                raise ValueError(f"the attention plan is for {mine} {name} but the run has {theirs}; {hint}make a "
                                 "plan for this model and setting (jquant fastattn).")
        if self.layout != layout:
            raise ValueError(f"the attention plan is for {self.layout} but the run has {layout} (another resolution "
                             "or text length); make a plan for this setting.")

    # -- cost ------------------------------------------------------------------------------------------------------
    def head_pairs(self) -> np.ndarray:
        """``[T, L, H]`` (query, key) pairs each head scores under the plan (0 when reused; a WA-RS refresh scores
        the full matrix and the window)."""
        w, r = np.asarray(self.windows), np.asarray(self.residual)
        full = self.layout.length ** 2
        local = arrow_pairs if self.pattern == "arrow" else band_pairs
        widths = np.unique(w[w >= 1])
        table = {int(x): local(self.layout, int(x)) for x in widths}
        pairs = np.zeros(w.shape, np.int64)
        pairs[w == FULL] = full
        for x, n in table.items():
            pairs[w == x] = n
        return pairs + np.where(r == REFRESH, full, 0)

    def attention_flops(self, head_dim: int, batch: int = 1) -> int:
        """FLOPs of all attention score and mix products over the run: ``4 D`` per scored pair per batch row."""
        return int(self.head_pairs().sum()) * 4 * head_dim * batch

    def attention_fraction(self) -> float:
        """Attention FLOPs relative to the uncompressed model (1.0 = no saving)."""
        return float(self.head_pairs().sum()) / float(self.windows.size * self.layout.length ** 2)

    def counts(self) -> dict[str, int]:
        """How many (step, layer, head) entries run full, reuse, local attention and residual sharing."""
        w, r = np.asarray(self.windows), np.asarray(self.residual)
        return {"full": int((w == FULL).sum()), "reuse": int((w == REUSE).sum()), "local": int((w >= 1).sum()),
                "residual": int((r != NONE).sum())}

    # -- files -----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format_version": PLAN_VERSION, "pattern": self.pattern, "layout": dataclasses.asdict(self.layout),
                "windows": np.asarray(self.windows).tolist(), "residual": np.asarray(self.residual).tolist(),
                "info": dict(self.info)}

    @classmethod
    def from_json(cls, data: dict, source: str = "attention plan") -> AttentionPlan:
        if data.get("format_version") != PLAN_VERSION:
            raise ValueError(f"{source}: format_version {data.get('format_version')!r} is not {PLAN_VERSION}; make "
                             "the plan again with this version of jquant.")
        try:
            return cls.build(np.asarray(data["windows"]), JointLayout(**data["layout"]),
                             residual=np.asarray(data["residual"]), pattern=data["pattern"], **data.get("info", {}))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: not an attention plan ({err!r}); write it with AttentionPlan.save.") from None

    def save(self, folder: str | Path) -> Path:
        """Write ``attention_plan.json`` into ``folder`` (a pipeline folder being written, see
        ``jquant.text_to_image.save_pipeline``)."""
        path = Path(folder) / PLAN_FILE
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AttentionPlan | None:
        """The plan saved in ``folder``, or None when it has none."""
        path = Path(folder) / PLAN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); write the plan again with jquant fastattn.") from None
        return cls.from_json(data, str(path))
