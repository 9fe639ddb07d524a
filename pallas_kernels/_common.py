"""What every kernel file shares: tile configs, the backend switch and operand preparation.

All kernels are written for the Pallas **Triton** GPU backend (``pallas_call`` with
``jax.experimental.pallas.triton.CompilerParams``). It runs on CUDA GPUs with
JAX 0.10 and 0.11 (0.11 deprecates it in favour of Mosaic GPU; see
docs/kernels.md) and, with ``interpret=True``, on any backend, which is how the
CPU test suite checks every kernel against its pure-jnp reference.

Operands are whole arrays in global memory (no ``BlockSpec``); each program
computes its tile offsets from ``pl.program_id`` and loads power-of-two tiles
with ``pl.ds``. The K loop runs inside the program (``lax.fori_loop``); with
``split_k > 1`` a third grid axis splits K and the partial sums are added by XLA.

Packed 4-bit weights (``QArray`` codes packed along the contraction axis, element
2i in the low nibble, 2i+1 in the high nibble) are consumed as stored: the
activations are permuted once to ``[x[:, 0::2], x[:, 1::2]]`` so the low-nibble
tile multiplies the even half and the high-nibble tile the odd half. No weight
re-layout is needed.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

INTERPRET_ENV = "JQUANT_PALLAS_INTERPRET"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of a matmul kernel.

    ``block_k`` counts logical K elements per loop step (so a 4-bit step reads
    ``block_k / 2`` packed rows). ``split_k`` splits K across programs.
    ``block_m = 1`` selects the GEMV variant of the weight-only kernels.
    ``quantize_in_kernel`` (int8/fp8 activation kernels): quantize activation tiles in
    registers (re-done for every N tile) instead of one fused XLA pass before the call.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    quantize_in_kernel: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self)


def interpret_mode() -> bool:
    """True unless the default backend is a GPU (or ``JQUANT_PALLAS_INTERPRET=1`` forces it)."""
    if os.environ.get(INTERPRET_ENV, "") == "1":
        return True
    return jax.default_backend() != "gpu"


def launch(kernel, operands: tuple, *, name: str, cfg: TileConfig, n: int, m: int,
           dtype: jnp.dtype, interpret: bool) -> jax.Array:
    """Runs ``kernel`` on the grid ``(Mp / block_m, N / block_n, split_k)`` and returns ``[m, N]``.

    The kernel writes float32 partial sums ``[split_k, Mp, N]`` (``Mp`` = rows of the
    padded activation, ``operands[0]``); XLA adds them, crops padding rows and casts.
    """
    rows = operands[0].shape[0]
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, rows, n), jnp.float32),
        grid=(rows // cfg.block_m, n // cfg.block_n, cfg.split_k),
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=name,
    )(*operands)
    return jnp.sum(partial, axis=0)[:m].astype(dtype)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads ``x [M, K]`` along M to a multiple of ``multiple``."""
    extra = -x.shape[0] % multiple
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def even_odd_split(x: jax.Array) -> jax.Array:
    """``[M, K] -> [M, K]`` = ``concat(x[:, 0::2], x[:, 1::2])`` (the order packed 4-bit codes need)."""
    return jnp.concatenate([x[:, 0::2], x[:, 1::2]], axis=1)


def round_half_even(v: jax.Array) -> jax.Array:
    """float32 round-half-to-even (Pallas Triton lowers ``floor`` but not ``round``).

    ``f = floor(v)``; round up when the fraction exceeds 1/2, or equals 1/2 and ``f``
    is odd. Exact for every float32 (the fraction ``v - f`` is exact).
    """
    f = jnp.floor(v)
    frac = v - f
    odd = (f - 2.0 * jnp.floor(0.5 * f)) != 0
    return jnp.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)


def sign_extend_4bit(u: jax.Array) -> jax.Array:
    """int32 nibbles in [0, 15] -> two's-complement values in [-8, 7]."""
    return u - ((u >> 3) << 4)


def check_activation(x: jax.Array, k: int, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be [M, K], got shape {x.shape}.")
    if x.shape[1] != k:
        raise ValueError(f"{what}: x has K={x.shape[1]} but the weight has K={k} (layout [in, out]).")
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"{what}: x must be bfloat16, float16 or float32, got {x.dtype}.")


def check_tiles(what: str, cfg: TileConfig, k: int, n: int, k_step: int) -> None:
    """Raises if ``(K, N)`` does not tile with ``cfg`` (callers fall back instead of padding weights)."""
    for name in ("block_m", "block_n", "block_k"):
        if not is_power_of_two(getattr(cfg, name)):
            raise ValueError(f"{what}: {name}={getattr(cfg, name)} must be a power of two.")
    if n % cfg.block_n:
        raise ValueError(f"{what}: N={n} is not a multiple of block_n={cfg.block_n}.")
    if k % (k_step * cfg.split_k):
        raise ValueError(f"{what}: K={k} is not a multiple of the K step {k_step} x split_k {cfg.split_k}.")
