"""The one block walker: each block is calibrated on the outputs of the blocks already processed.

A model family supports it with its *stages*: ``model.calibration_stages() -> [Stage]``, each a list
of blocks and a function giving the stage's first ``(hidden, context)`` from the calibration batch
and the previous stage's final ``(hidden, context)``. A vision tower feeding an LLM is two stages
(patches -> tower blocks; tower output merged into the text embeddings -> LLM blocks); dual-stream
then single-stream DiT blocks are two stages too. A family without ``calibration_stages`` has one
stage: ``model.blocks()`` entered through ``model.block_inputs(batch) -> (hidden, context)``.
Each block has ``block.calibration_forward(hidden, context) -> hidden``.

``walk_blocks`` keeps only the current states of the calibration set (one block's activations),
captures the input statistics of every site inside the block (``jquant.calib.capture``, per group
when the model declares ``ActivationGroups``), hands them to ``visit`` (which may replace the
block's weights, e.g. by quantized ones, or measure it), then recomputes the block's outputs with
the visited block, so the next block sees what the processed model really feeds it. It serves
``jquant.quantize``, the transforms' statistics, KV calibration, MxMoE's sensitivity and WKVQuant.

The block forward is one ``nnx.jit`` function, so it compiles once per distinct block structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jquant.calib.capture import InputStatistics, capture_statistics, set_capture
from jquant.calib.data import Calibration, batches
from jquant.progress import progress_bar
from jquant.sharding import shard_batch
from jquant.sites import activation_groups, path_string

State = tuple[Any, Any]
"""``(hidden, context)`` of one calibration batch between two blocks."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """Consecutive blocks sharing one ``(hidden, context)`` convention.

    ``enter(model, batch, previous)`` gives the stage's first state for a calibration batch;
    ``previous`` is the previous stage's final ``(hidden, context)`` (None for the first stage).
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


block_forward = nnx.jit(_forward)
_block_statistics = capture_statistics(_forward)


def calibration_stages(model: nnx.Module) -> list[Stage]:
    """The model's stages (``model.calibration_stages()``), or its blocks as one stage."""
    stages = getattr(model, "calibration_stages", None)
    if stages is not None:
        return list(stages())
    return [Stage(blocks=model.blocks(), enter=lambda m, batch, previous: m.block_inputs(batch))]


def block_paths(model: nnx.Module) -> dict[int, str]:
    """``id(block) -> path`` for the blocks of every stage of ``model`` (to build full site paths)."""
    ids = {id(b) for stage in calibration_stages(model) for b in stage.blocks}
    return {id(node): path_string(path) for path, node in nnx.iter_graph(model) if id(node) in ids}


def walk_blocks(
    model: nnx.Module,
    calib: Calibration,
    visit: Callable[[BlockVisit], None],
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    capture: bool = True,
    description: str = "calibrate",
    progress: bool = True,
) -> list[State]:
    """Walk ``model``'s blocks in order on ``calib`` (a pytree with a leading sample axis); returns the final states.

    ``visit(BlockVisit)`` runs once per block, after its statistics are captured (``capture``) and
    before its outputs are recomputed. With a ``mesh``, each batch is split over its ``"data"`` axis;
    the host-side float64 sums make the statistics independent of batching and sharding.
    """
    chunks = batches(calib, batch_size)
    place = (lambda c: jax.tree.map(jax.numpy.asarray, c)) if mesh is None else (
        lambda c: jax.tree.map(lambda leaf: shard_batch(leaf, mesh), c))
    chunks = [place(c) for c in chunks]
    groups = activation_groups(model)
    num_groups = None if groups is None else len(groups.names)
    paths = block_paths(model)
    stages = calibration_stages(model)
    states: list[State] | None = None
    index = 0
    with progress_bar(total=sum(len(s.blocks) for s in stages), description=description, enabled=progress) as bar:
        for s, stage in enumerate(stages):
            enter = nnx.jit(stage.enter)
            states = [enter(model, c, None if states is None else states[i]) for i, c in enumerate(chunks)]
            for block in stage.blocks:
                stats: dict[str, InputStatistics] = {}
                if capture:
                    set_capture(block, True, num_groups=num_groups)
                    for hidden, context in states:
                        _, new = _block_statistics(block, hidden, context)
                        stats = new if not stats else {p: stats[p].merge(st) for p, st in new.items()}
                    set_capture(block, False)
                visit(BlockVisit(path=paths[id(block)], block=block, index=index, stage=s, inputs=states,
                                 stats=stats, forward=block_forward))
                states = [(block_forward(block, hidden, context), context) for hidden, context in states]
                index += 1
                bar.update(1)
    return states
