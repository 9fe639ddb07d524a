"""Rotary position embeddings over position tuples: 1-D text, Qwen2-VL M-RoPE, 3-D video and Flux ids.

A token carries ``P`` position components, ``positions [..., T, P]``: 1 for text, 3 for Qwen2-VL's
(temporal, height, width), 3 for video DiTs' (frame, height, width), Flux's ``ids`` (3 axes).
``rope_angles`` turns them into ``F = D / 2`` angles ``θ [..., T, F]`` (float32), one per rotated pair:

- **axes** (``sections=None``; Flux ``axes_dim``, HunyuanVideo ``rope_dim``, 1-D RoPE with one axis):
  component ``p`` owns ``dims[p] / 2`` consecutive pairs with its own frequency ladder,
  ``θ[..., f_p + i] = positions[..., p] * theta^(-2i / dims[p])``;
- **sections** (Qwen2-VL M-RoPE, ``mrope_section``): one ladder over ``dims = (D,)``,
  ``θ[..., f] = positions[..., c(f)] * theta^(-2f / D)`` where pair ``f`` lies in section ``s``
  (``sum(sections) = D / 2``) and ``c(f) = s mod P``.

``rope_cos_sin(θ, style)`` lays ``cos θ, sin θ`` over the ``D`` features and ``apply_rope`` rotates:
``y = x cos + rot(x) sin`` with, per style,

- ``"half"`` (Llama, Qwen, GPT-NeoX): pair ``f`` is features ``(f, f + D/2)``; ``rot(x) = [-x₂, x₁]``,
  ``cos = [cos θ, cos θ]``;
- ``"interleaved"`` (GPT-J, Flux, HunyuanVideo, CogVideoX; diffusers ``use_real_unbind_dim=-1``):
  pair ``f`` is features ``(2f, 2f + 1)``; ``rot(x)[2f] = -x[2f+1]``, ``rot(x)[2f+1] = x[2f]``,
  ``cos = repeat(cos θ, 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

RopeStyle = Literal["half", "interleaved"]
STYLES = ("half", "interleaved")


def inverse_frequencies(dim: int, theta: float, *, dtype: type = np.float32) -> np.ndarray:
    """``theta^(-2i / dim)`` for ``i < dim / 2`` as float32, computed in ``dtype``.

    float32 rounds as transformers and diffusers do by default; float64 as Flux (``freqs_dtype=float64``).
    """
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"inverse_frequencies: dim={dim!r} must be a positive even int (features rotated in pairs).")
    if theta <= 0:
        raise ValueError(f"inverse_frequencies: theta={theta} must be positive.")
    exponent = np.arange(0, dim, 2, dtype=dtype) / dtype(dim)
    return (1.0 / (dtype(theta) ** exponent)).astype(np.float32)


def rope_angles(
    positions: jax.Array,
    *,
    dims: Sequence[int],
    theta: float = 10000.0,
    sections: Sequence[int] | None = None,
    inv_freq: Sequence[np.ndarray] | None = None,
    freq_dtype: type = np.float32,
) -> jax.Array:
    """Angles ``[..., T, D / 2]`` float32 for ``positions [..., T, P]`` (module docstring for the two layouts).

    Args:
      positions: ``[..., T, P]`` integer or float positions, one column per component.
      dims: per-component rotary dims (axes layout, ``len(dims) == P``), or ``(D,)`` with ``sections``.
      theta: the frequency base.
      sections: M-RoPE's pair counts per section (``sum == D / 2``); section ``s`` reads component ``s mod P``.
      inv_freq: ladders replacing ``inverse_frequencies(dims[p], theta)``, one per entry of ``dims``
        (scaled RoPE such as Llama 3's, ``models.layers.rope_inverse_frequencies``).
      freq_dtype: precision the ladders are computed in (``np.float64`` for Flux).
    """
    dims = tuple(dims)
    p = positions.shape[-1] if positions.ndim >= 2 else 0
    if p == 0:
        raise ValueError(f"rope_angles: positions must be [..., T, P] with P >= 1 components, got shape "
                         f"{positions.shape}; add a trailing axis for 1-D positions (positions[..., None]).")
    if sections is None and len(dims) != p:
        raise ValueError(f"rope_angles: dims={dims} gives {len(dims)} components but positions has P={p}; give one "
                         "rotary dim per position component.")
    if sections is not None and (len(dims) != 1 or sum(sections) * 2 != dims[0] or min(sections) < 0):
        raise ValueError(f"rope_angles: sections={tuple(sections)} need dims=(D,) with sum(sections) = D / 2 "
                         f"(non-negative pair counts), got dims={dims}.")
    ladders = ([inverse_frequencies(d, theta, dtype=freq_dtype) for d in dims] if inv_freq is None
               else [np.asarray(f, np.float32) for f in inv_freq])
    if [2 * len(f) for f in ladders] != list(dims):
        raise ValueError(f"rope_angles: inv_freq must hold dims[p] / 2 frequencies per component, got lengths "
                         f"{[len(f) for f in ladders]} for dims={dims}.")
    pos = positions.astype(jnp.float32)
    if sections is not None:
        component = np.repeat(np.arange(len(sections)) % p, sections)  # [D / 2]: the component pair f reads
        return jnp.take(pos, component, axis=-1) * jnp.asarray(ladders[0])
    return jnp.concatenate([pos[..., c:c + 1] * jnp.asarray(f) for c, f in enumerate(ladders)], axis=-1)


def _check_style(style: str, where: str) -> None:
    if style not in STYLES:
        raise ValueError(f"{where}: style={style!r}; use 'half' (Llama / Qwen) or 'interleaved' (Flux / GPT-J).")


def rope_cos_sin(angles: jax.Array, style: RopeStyle, dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``angles [..., T, D / 2]`` -> ``cos, sin [..., T, D]`` in ``dtype`` (computed in float32), laid out for ``style``."""
    _check_style(style, "rope_cos_sin")
    if style == "half":
        angles = jnp.concatenate([angles, angles], axis=-1)
    else:
        angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, style: RopeStyle) -> jax.Array:
    """Rotate ``x [..., T, H, D]`` by ``cos, sin [..., T, D]`` (shared by the ``H`` heads): ``x cos + rot(x) sin``.

    Computed in the promoted dtype of ``x`` and ``cos`` (float32 tables rotate a bf16 ``x`` in float32, as
    diffusers does; tables in ``x.dtype`` as transformers does) and returned in ``x.dtype``.
    """
    _check_style(style, "apply_rope")
    if cos.shape[-1] != x.shape[-1] or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x has {x.shape[-1]} features but cos/sin have {cos.shape[-1]}; both must be "
                         "the same even head dim.")
    if style == "half":
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    else:
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)
