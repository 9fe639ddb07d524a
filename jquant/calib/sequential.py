"""Block-by-block calibration: each block is calibrated on the outputs of the blocks already processed.

A model family supports this by providing ``model.block_inputs(tokens) ->
(hidden, context)``, ``model.blocks()`` and, on each block,
``block.calibration_forward(hidden, context) -> hidden``. The driver keeps
only the current hidden states of the calibration set (one block's
activations), captures the statistics of every site inside the block
(``jquant.calib.capture``), hands them to ``process_block`` (which may
replace the block's weights, e.g. by quantized ones), and then recomputes the
block's outputs with the processed block, so block ``i + 1`` sees what a
quantized model really feeds it.

The block forward is one ``nnx.jit`` function, so it compiles once per
distinct block structure (identical layers share one compilation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jquant.calib.capture import InputStatistics, capture_statistics, set_capture
from jquant.progress import progress_bar
from jquant.sharding import shard_batch
from jquant.sites import path_string

ProcessBlock = Callable[[str, nnx.Module, dict[str, InputStatistics]], None]


def _forward(block, hidden, context):
    return block.calibration_forward(hidden, context)


_block_forward = nnx.jit(_forward)
_block_statistics = capture_statistics(_forward)


def block_paths(model: nnx.Module) -> dict[int, str]:
    """``id(block) -> path`` for the blocks of ``model`` (to build full site paths)."""
    ids = {id(b) for b in model.blocks()}
    return {id(node): path_string(path) for path, node in nnx.iter_graph(model) if id(node) in ids}


def run_sequential(
    model: nnx.Module,
    tokens: np.ndarray,
    process_block: ProcessBlock,
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> None:
    """Calibrate ``model`` block by block on ``tokens [N, T]`` (mutates blocks through ``process_block``).

    ``process_block(block_path, block, stats)`` receives the statistics of each
    site in the block, keyed by path relative to the block. With a ``mesh``,
    each calibration batch is split over its ``"data"`` axis; the captured
    sums (``X^T X``) are then reduced across devices by XLA.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"calibration tokens must be a non-empty [N, T] array, got shape {tokens.shape}.")
    chunks = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
    place = (lambda c: jax.numpy.asarray(c)) if mesh is None else (lambda c: shard_batch(c, mesh))
    embed = nnx.jit(lambda m, t: m.block_inputs(t))
    states = [embed(model, place(c)) for c in chunks]
    paths = block_paths(model)
    blocks = model.blocks()
    with progress_bar(total=len(blocks), description="calibrate", enabled=progress) as bar:
        for block in blocks:
            set_capture(block, True)
            stats: dict[str, InputStatistics] = {}
            for hidden, context in states:
                _, new = _block_statistics(block, hidden, context)
                stats = new if not stats else {p: stats[p].merge(s) for p, s in new.items()}
            set_capture(block, False)
            process_block(paths[id(block)], block, stats)
            states = [(_block_forward(block, hidden, context), context) for hidden, context in states]
            bar.update(1)
