"""RWKV-6's WKV recurrence (the attention of RWKV models): recurrent and chunked forms.

Models call these through ``jquant.ops`` so that a kernel can replace them here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def wkv6_recurrent(r, k, v, log_w, u, state):
    """The WKV6 recurrence, one token at a time (``lax.scan`` over ``T``; ``T = 1`` when decoding).

    ``r, k, v, log_w [B, T, H, N]`` (``log_w = log w ≤ 0``), bonus ``u [H, N]``,
    ``state [B, H, N, N]`` (key index first). Per head:
    ``o_t = r_t (S + diag(u) k_tᵀ v_t)``, ``S ← diag(w_t) S + k_tᵀ v_t``.
    Returns ``o [B, T, H, N]`` and the final state.
    """

    def step(s, xs):
        rt, kt, vt, lwt = xs  # [B, H, N]
        kv = kt[..., :, None] * vt[..., None, :]
        o = jnp.einsum("bhi,bhij->bhj", rt, s + u[..., None] * kv, precision=jax.lax.Precision.HIGHEST)
        return jnp.exp(lwt)[..., None] * s + kv, o

    state, o = jax.lax.scan(step, state, tuple(jnp.swapaxes(a, 0, 1) for a in (r, k, v, log_w)))
    return jnp.swapaxes(o, 0, 1), state


def _shift_right(a: jax.Array, axis: int) -> jax.Array:
    """``a`` moved one step along ``axis``, a zero entering first (``out[q] = a[q - 1]``, ``out[0] = 0``)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(a, pad), 0, a.shape[axis], axis=axis)


def _wkv6_chunk(s, xs, u):
    """One chunk of ``wkv6_chunked``: ``s [B, H, N, N]``, ``r, k, v, log_w [B, H, L, N]``.

    With the decay between positions ``E_{t,s} = Σ_{s<q<t} log w_q`` (per channel):

      ``o_t = Σ_{s<t} (Σ_i r_t[i] k_s[i] e^{E_{t,s}[i]}) v_s + (r_t·(u⊙k_t)) v_t + (r_t ⊙ e^{E_{t,-1}}) S``
      ``S' = diag(e^{E_{L,-1}}) S + Σ_s (k_s ⊙ e^{E_{L,s}})ᵀ v_s``

    Every ``E`` is summed directly from the log-decays it spans (prefix, suffix
    and pairwise "segment" sums), never as a difference of cumulative sums: the
    exponents are ``≤ 0`` (no overflow however strong the decay) and carry no
    cancellation error when a strong decay precedes weak ones. The pairwise
    ``[L, L, N]`` decays are formed explicitly.
    """
    r, k, v, log_w = xs
    hp = jax.lax.Precision.HIGHEST
    length = r.shape[2]
    pos = jnp.arange(length)
    # E_{t,s} for s < t: cumulative sums over q of log w_{q-1}, masked to q - 1 > s  -> [B, H, s, t, N]
    shifted = _shift_right(log_w, axis=2)[:, :, None, :, :]
    segment = jnp.cumsum(jnp.where((pos[None, :] > pos[:, None] + 1)[:, :, None], shifted, 0.0), axis=3)
    causal = (pos[:, None] > pos[None, :])[:, :, None]  # [t, s, 1]: s < t
    decay = jnp.where(causal, jnp.exp(jnp.swapaxes(segment, 2, 3)), 0.0)  # [B, H, t, s, N]
    scores = jnp.einsum("bhti,bhsi,bhtsi->bhts", r, k, decay, precision=hp)
    o = jnp.einsum("bhts,bhsj->bhtj", scores, v, precision=hp)
    o = o + jnp.sum(r * u[:, None, :] * k, axis=-1, keepdims=True) * v
    prefix = jnp.cumsum(_shift_right(log_w, axis=2), axis=2)  # E_{t,-1} = Σ_{q<t} log w_q
    o = o + jnp.einsum("bhti,bhij->bhtj", r * jnp.exp(prefix), s, precision=hp)
    suffix = jnp.flip(jnp.cumsum(_shift_right(jnp.flip(log_w, axis=2), axis=2), axis=2), axis=2)  # Σ_{q>s} log w_q
    total = jnp.sum(log_w, axis=2)  # E_{L,-1}
    s = jnp.exp(total)[..., None] * s + jnp.einsum("bhsi,bhsj->bhij", k * jnp.exp(suffix), v, precision=hp)
    return s, o


def wkv6_chunked(r, k, v, log_w, u, state, *, chunk_size: int):
    """``wkv6_recurrent``'s result computed chunk by chunk (no loop over single tokens).

    The sequence is zero-padded to a multiple of ``chunk_size`` (padded tokens
    have ``k = v = 0`` and ``log w = 0``, so they leave the state unchanged);
    inside a chunk the outputs are matrix products (``_wkv6_chunk``) and the
    state is carried across chunks by ``lax.scan``. Cost per chunk is
    ``O(B H L² N)``; memory holds one chunk's ``[B, H, L, L, N]`` decays.
    """
    b, t, h, n = r.shape
    chunks = -(-t // chunk_size)
    pad = chunks * chunk_size - t

    def split(a):  # [B, T, H, N] -> [chunks, B, H, L, N]
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return a.reshape(b, chunks, chunk_size, h, n).transpose(1, 0, 3, 2, 4)

    state, o = jax.lax.scan(lambda s, xs: _wkv6_chunk(s, xs, u), state, tuple(split(a) for a in (r, k, v, log_w)))
    o = o.transpose(1, 0, 3, 2, 4).reshape(b, chunks * chunk_size, h, n)
    return o[:, :t], state
