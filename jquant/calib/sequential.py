"""The one block walker: each block is calibrated on the outputs of the blocks already processed.

A model family supports it with its *stages*: ``model.calibration_stages() -> [Stage]``, each a list
of blocks and a function giving the stage's first ``(hidden, context)`` from the calibration batch
and the previous stage's final ``(hidden, context)``. A vision tower feeding an LLM is two stages
(patches -> tower blocks; tower output merged into the text embeddings -> LLM blocks); dual-stream
then single-stream DiT blocks are two stages too. A family without ``calibration_stages`` has one
stage: ``model.blocks()`` entered through ``model.block_inputs(batch) -> (hidden, context)``.
Each block has ``block.calibration_forward(hidden, context) -> hidden``. Every leaf of ``hidden``
holds the batch on its leading axis; a leaf of ``context`` does or is shared by the batch (e.g. RoPE
tables), which ``walk_blocks`` reads off the stage entry's output shapes.

``walk_blocks`` keeps only the current states of the calibration set (one block's activations),
captures the input statistics of every site inside the block (``jquant.calib.capture``, per group
when the model declares ``ActivationGroups``), hands them to ``visit`` (which may replace the
block's weights, e.g. by quantized ones, or measure it), then recomputes the block's outputs with
the visited block, so the next block sees what the processed model really feeds it. It serves
``jquant.quantize``, the transforms' statistics, KV calibration, MxMoE's sensitivity and WKVQuant.

**Capture memory.** Statistics are recorded per sequence (one float32 ``[in, in]`` Gram per sequence
and site, ``G`` of them for grouped sites), so a capture call on ``B`` sequences holds ``B`` times the
block's per-sequence bytes. The capture pass therefore runs on sub-batches of each calibration batch
of at most ``capture_budget // bytes per sequence`` sequences (one at least; default
``CAPTURE_BUDGET_BYTES``), continuing the host's float64 sums sequence by sequence, so the statistics
equal those of one call on the whole batch up to the float32 rounding of the block's forward at a
different batch shape (XLA:CPU's results may depend on it; equal in the tests at 1 vs 4 sequences).
Stacked expert sites record one Gram per call over all the rows routed to each expert; they are
captured in one more call on the whole batch (their memory, ``E in²`` per site, does not grow with ``B``).
On the host, sites that read one input (q/k/v, gate/up) keep one float64 set of sums between them
(``statistics_from_state``); ``experiments/results/gptq_speed.md`` measures a whole ``quantize`` call's peak.

The block forward and the capture are ``module_jit`` functions at module level, and the stage entry is
one too, with the stage's ``enter`` function as a static argument: each compiles once per distinct
block (or model) structure and input shape, across ``walk_blocks`` calls, as long as the family's
``enter`` is the same function object each time (a module-level function, not a lambda or a function
defined inside ``calibration_stages``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jquant.calib.capture import InputStatistics, capture_statistics, set_capture
from jquant.calib.data import Calibration, batches
from jquant.module_jit import module_jit
from jquant.progress import progress_bar
from jquant.sharding import shard_batch
from jquant.sites import activation_groups, path_string

State = tuple[Any, Any]
"""``(hidden, context)`` of one calibration batch between two blocks."""

CAPTURE_BUDGET_BYTES = 2 * 1024**3
"""Default bound on the per-sequence statistics one capture call holds (``walk_blocks``' ``capture_budget``)."""


def check_capture_budget(capture_budget: int | None, caller: str) -> int:
    """The capture budget in bytes (``CAPTURE_BUDGET_BYTES`` for None); a clear error naming ``caller`` otherwise."""
    budget = CAPTURE_BUDGET_BYTES if capture_budget is None else capture_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{caller}: capture_budget must be a positive number of bytes (or None for "
                         f"CAPTURE_BUDGET_BYTES = {CAPTURE_BUDGET_BYTES}), got {capture_budget!r}.")
    return budget


@dataclasses.dataclass(frozen=True)
class Stage:
    """Consecutive blocks sharing one ``(hidden, context)`` convention.

    ``enter(model, batch, previous)`` gives the stage's first state for a calibration batch;
    ``previous`` is the previous stage's final ``(hidden, context)`` (None for the first stage).
    Give a module-level function (the same object on every ``calibration_stages()`` call), so the
    entry compiles once per model structure.
    """

    blocks: Sequence[nnx.Module]
    enter: Callable[[nnx.Module, Calibration, State | None], State]


@dataclasses.dataclass
class BlockVisit:
    """What ``walk_blocks`` hands its visitor for one block.

    ``inputs``: the block's input state per calibration batch (outputs of the processed blocks before
    it); ``stats``: input statistics of every site in the block, keyed by path relative to the block
    (empty when not capturing); ``index``: the block's position over all stages; ``stage``: its stage.
    ``forward(block, hidden, context)`` is the jitted block forward.
    """

    path: str
    block: nnx.Module
    index: int
    stage: int
    inputs: list[State]
    stats: dict[str, InputStatistics]
    forward: Callable[[nnx.Module, Any, Any], Any]


def _forward(block, hidden, context):
    return block.calibration_forward(hidden, context)


def _enter(enter, model, batch, previous):
    return enter(model, batch, previous)


block_forward = module_jit(_forward)
_block_statistics = capture_statistics(_forward)
_stage_entry = module_jit(_enter, static_argnums=0)


def _enter_block_inputs(model: nnx.Module, batch: Calibration, previous: State | None) -> State:
    """The default (single) stage's entry: ``model.block_inputs(batch)``."""
    return model.block_inputs(batch)


def calibration_stages(model: nnx.Module) -> list[Stage]:
    """The model's stages (``model.calibration_stages()``), or its blocks as one stage."""
    stages = getattr(model, "calibration_stages", None)
    if stages is not None:
        return list(stages())
    return [Stage(blocks=model.blocks(), enter=_enter_block_inputs)]


def block_paths(model: nnx.Module) -> dict[int, str]:
    """``id(block) -> path`` for the blocks of every stage of ``model`` (to build full site paths)."""
    ids = {id(b) for stage in calibration_stages(model) for b in stage.blocks}
    return {id(node): path_string(path) for path, node in nnx.iter_graph(model) if id(node) in ids}


def _batch_size(state: State) -> int:
    return jax.tree.leaves(state[0])[0].shape[0]


def _resized(tree: Any, batched: Any, n: int) -> Any:
    """Shapes of ``tree`` with the leading axis of its ``batched`` leaves set to ``n``."""
    return jax.tree.map(lambda a, b: jax.ShapeDtypeStruct(((n,) + a.shape[1:]) if b else a.shape, a.dtype),
                        tree, batched)


def _context_batched(enter: Callable, model: nnx.Module, chunk: Calibration, previous: State | None,
                     previous_context: Any, state: State) -> Any:
    """Which leaves of the stage's context hold the batch on their leading axis (a tree of bools).

    Read off the entry's output shapes for one sequence against those of ``state``, its output for the
    whole ``chunk`` (more than one sequence); ``previous_context`` is the previous stage's such tree.
    """
    every = lambda tree: jax.tree.map(lambda _: True, tree)  # noqa: E731
    previous_one = None if previous is None else _resized(previous, (every(previous[0]), previous_context), 1)
    one = _stage_entry.eval_shape(enter, model, _resized(chunk, every(chunk), 1), previous_one)
    b = _batch_size(state)

    def leading(single, whole) -> bool:
        if single.shape == whole.shape:
            return False
        if single.shape != (1,) + whole.shape[1:]:
            raise ValueError(f"walk_blocks: a context leaf of shape {whole.shape} for {b} sequences has shape "
                             f"{single.shape} for one; context leaves must hold the batch on their leading axis "
                             "or not depend on it (fix the family's calibration stage entry).")
        return True

    return jax.tree.map(leading, one[1], state[1])


def _rows(state: State, context_batched: Any, start: int, stop: int) -> State:
    """Sequences ``start:stop`` of ``state``."""
    hidden, context = state
    take = lambda a, b=True: a[start:stop] if b else a  # noqa: E731
    return jax.tree.map(take, hidden), jax.tree.map(take, context, context_batched)


def _capture(block: nnx.Module, state: State, context_batched: Any, budget: int, num_groups: int | None,
             running: dict[str, InputStatistics] | None) -> dict[str, InputStatistics]:
    """Input statistics of ``block``'s sites on ``state``, in sub-batches within ``budget`` (module docstring),
    continuing ``running`` (the earlier batches' statistics, consumed: their sums grow in place).

    ``block``'s capture is on (``set_capture``); it is on again for every site on return.
    """
    layout = _block_statistics.layout(block, *state)
    b = _batch_size(state)
    fit = layout.sequences_within(budget)
    if b <= fit:
        return _block_statistics(block, *state, running=running)[1]
    size = math.ceil(b / math.ceil(b / fit))  # the fewest calls, as even as equal slices allow
    stats = running
    try:
        set_capture(block, True, num_groups=num_groups, only=set(layout.bytes_per_sequence))
        for start in range(0, b, size):
            _, new = _block_statistics(block, *_rows(state, context_batched, start, start + size), running=stats)
            stats = new if stats is None else stats | new
        if layout.per_call:
            set_capture(block, True, num_groups=num_groups, only=set(layout.per_call))
            stats |= _block_statistics(block, *state, running=running)[1]
    finally:
        set_capture(block, True, num_groups=num_groups)
    return {p: stats[p] for p in layout.order}


def walk_blocks(
    model: nnx.Module,
    calib: Calibration,
    visit: Callable[[BlockVisit], None],
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    capture: bool = True,
    capture_budget: int | None = None,
    description: str = "calibrate",
    progress: bool = True,
    final_states: bool = True,
) -> list[State]:
    """Walk ``model``'s blocks in order on ``calib`` (a pytree with a leading sample axis); returns the final states
    (``final_states=False``: the last block's outputs, which nothing else reads, are not computed and ``[]`` is
    returned; for one wide block that forward is a fifth of a GPTQ call's time).

    ``visit(BlockVisit)`` runs once per block, after its statistics are captured (``capture``) and
    before its outputs are recomputed. With a ``mesh``, each batch is split over its ``"data"`` axis;
    the host-side float64 sums make the statistics independent of batching and sharding.
    ``capture_budget``: bytes of per-sequence statistics one capture call may hold (default
    ``CAPTURE_BUDGET_BYTES``); a batch whose statistics exceed it is captured in sub-batches, with the
    same statistics (module docstring).
    """
    budget = check_capture_budget(capture_budget, "walk_blocks")
    chunks = batches(calib, batch_size)
    place = (lambda c: jax.tree.map(jax.numpy.asarray, c)) if mesh is None else (
        lambda c: jax.tree.map(lambda leaf: shard_batch(leaf, mesh), c))
    chunks = [place(c) for c in chunks]
    groups = activation_groups(model)
    num_groups = None if groups is None else len(groups.names)
    paths = block_paths(model)
    stages = calibration_stages(model)
    states: list[State] | None = None
    context_batched: Any = None  # the current states' context: which leaves hold the batch on their leading axis
    index = 0
    with progress_bar(total=sum(len(s.blocks) for s in stages), description=description, enabled=progress) as bar:
        for s, stage in enumerate(stages):
            previous = states
            states = [_stage_entry(stage.enter, model, c, None if previous is None else previous[i])
                      for i, c in enumerate(chunks)]
            if capture and _batch_size(states[0]) > 1:  # sub-batches are possible: find the batched context leaves
                context_batched = _context_batched(stage.enter, model, chunks[0],
                                                   None if previous is None else previous[0], context_batched,
                                                   states[0])
            for block in stage.blocks:
                stats: dict[str, InputStatistics] = {}
                if capture:  # batches continue the running sums, so no batch's copy of a Gram is kept
                    set_capture(block, True, num_groups=num_groups)
                    for state in states:
                        stats = _capture(block, state, context_batched, budget, num_groups, stats or None)
                    set_capture(block, False)
                visit(BlockVisit(path=paths[id(block)], block=block, index=index, stage=s, inputs=states,
                                 stats=stats, forward=block_forward))
                last = s == len(stages) - 1 and block is stage.blocks[-1]
                if final_states or not last:
                    states = [(block_forward(block, hidden, context), context) for hidden, context in states]
                index += 1
                bar.update(1)
    return states if final_states else []
