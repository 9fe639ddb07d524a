"""The block protocol a video DiT offers per-block samplers (6Bit-Diffusion's routing and caches), checked up front.

A transformer takes part with (CogVideoX does)::

    hidden, context = dit.flow_embed(latents [B, f, h, w, C], sigmas [B], *text)   hidden: a tuple of streams
                                                                                   [B, T_i, d], the video first
    hidden = block(*hidden, *context, route=route)        for block in dit.blocks()
    velocity = dit.flow_head(hidden, context, latents.shape)

where ``route(name, x) -> group ids`` is called by each linear named in ``type(block).ROUTED_LINEARS`` (paths inside
the block, e.g. ``"attn1/to_q"``) with its input, and the linear is called with those group ids; without ``route``
the block is the plain one, and ``flow_velocity`` is the loop above.
"""

from __future__ import annotations

import inspect

from flax import nnx

from jquant.models.layers import Linear

METHODS = ("flow_embed", "flow_head", "flow_velocity", "blocks")


def check_block_dit(transformer: nnx.Module) -> tuple[str, ...]:
    """The routed linears' names of ``transformer``'s blocks; a ``TypeError`` naming what is missing otherwise."""
    name = type(transformer).__name__
    missing = [m for m in METHODS if not callable(getattr(transformer, m, None))]
    if missing:
        raise TypeError(f"{name} lacks {missing} of the block protocol (flow_embed / blocks / flow_head, see "
                        "jquant.video_mixed.protocol): 6Bit-Diffusion's routing and block cache need a DiT taken apart "
                        "into embed, blocks and head (CogVideoX has it).")
    blocks = transformer.blocks()
    if not blocks:
        raise TypeError(f"{name}.blocks() is empty: there is no block to route or cache.")
    kinds = {type(b) for b in blocks}
    if len(kinds) != 1:
        raise TypeError(f"{name}.blocks() mixes block types {sorted(k.__name__ for k in kinds)}; the block cache "
                        "takes one kind of block with one hidden structure.")
    block = blocks[0]
    names = getattr(block, "ROUTED_LINEARS", None)
    if not names or "route" not in inspect.signature(block.__call__).parameters:
        raise TypeError(f"{type(block).__name__} has no ROUTED_LINEARS and route= argument: its linears cannot "
                        "take a precision per step (see jquant.video_mixed.protocol).")
    for linear in names:
        routed_linear(block, linear)
    return tuple(names)


def routed_linear(block: nnx.Module, name: str) -> Linear:
    """The ``Linear`` at path ``name`` (``"attn1/to_q"``) inside ``block``."""
    module = block
    for part in name.split("/"):
        module = getattr(module, part, None)
    if not isinstance(module, Linear):
        raise TypeError(f"{type(block).__name__}.ROUTED_LINEARS names {name!r}, which is not a Linear of the block.")
    return module


def in_features(block: nnx.Module, names: tuple[str, ...]) -> tuple[int, ...]:
    """The input width of each routed linear (activation elements per token)."""
    return tuple(int(routed_linear(block, n).kernel.get_value().shape[0]) for n in names)
