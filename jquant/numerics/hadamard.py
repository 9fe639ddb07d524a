"""Hadamard matrices, the fast Walsh–Hadamard transform and random orthogonal matrices.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and satisfies ``H Hᵀ = n I``, so
``H / √n`` is orthogonal. jquant builds ``H_n = H_m ⊗ H_{2^k}`` (the QuaRot construction) for

* ``n = 2^k``: Sylvester's matrix ``H[i, j] = (-1)^popcount(i & j)`` (``m = 1``);
* ``n = m · 2^k`` with ``m`` in :data:`SMALL_HADAMARD_ORDERS`, built in code (nothing is
  downloaded) by these known constructions:

  ==========================  ======================================================
  order ``m``                 construction
  ==========================  ======================================================
  12, 20, 60, 108, 140        Paley I, prime ``q = m - 1 ≡ 3 (mod 4)``
  28, 36                      Paley II, prime ``q = m/2 - 1 ≡ 1 (mod 4)`` (13, 17)
  52, 156, 172                Goethals–Seidel array of four circulants of order
                              ``m/4`` (13, 39, 43) whose first rows are constant on the
                              orbits of a multiplier subgroup ``⟨g⟩ ≤ Z_{m/4}^*``
                              (Djoković's orbit method); the ±1 sign per orbit is stored
  ==========================  ======================================================

  Order 40 is ``20 · 2`` (``H_40 = H_20 ⊗ H_2``), so it needs no separate matrix. The
  Llama widths are covered: 11008 = 172 · 64 (Llama-2-7B), 14336 = 28 · 512 (Llama-3-8B).
  Any other odd part of ``n`` (e.g. ``n = 44 = 11 · 4``) is unsupported; see
  :func:`pad_to_hadamard_size`.

Symmetry: Sylvester and Paley II matrices are symmetric; Paley I and Goethals–Seidel matrices
are not, so neither is ``H_n`` for those ``m``. :func:`fwht` therefore takes ``inverse=True``
to apply ``Hᵀ``.

The sign sequences of the Goethals–Seidel orders were found by an exhaustive search over the
orbit sign patterns (``2^{#orbits}`` candidates per circulant, meet-in-the-middle on the summed
periodic autocorrelations) and are checked by the tests (``H Hᵀ = m I``).
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

# order m -> prime q ≡ 3 (mod 4), m = q + 1
_PALEY_I = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
# order m -> prime q ≡ 1 (mod 4), m = 2 (q + 1)
_PALEY_II = {28: 13, 36: 17}
# order m -> (circulant order v = m / 4, generator g of the multiplier subgroup,
#             four sign strings, one sign per orbit; orbits listed by their smallest element)
_GOETHALS_SEIDEL = {
    52: (13, 5, ("++--", "+--+", "+++-", "++--")),
    156: (39, 29, ("+++----+-+", "++---++-+-", "+++++----+", "+++-++----")),
    172: (43, 4, ("+++--+-", "++---+-", "++++---", "+++--+-")),
}

SMALL_HADAMARD_ORDERS: tuple[int, ...] = tuple(sorted({**_PALEY_I, **_PALEY_II, **_GOETHALS_SEIDEL}))
"""Stored non-power-of-two Hadamard orders ``m``; ``n = m · 2^k`` is supported."""


# ---- small Hadamard matrices (numpy int8, built once) -------------------------------------------
def _quadratic_character(q: int) -> np.ndarray:
    """Legendre symbol ``χ(a)`` for ``a = 0..q-1`` of a prime ``q``: 0, +1 (square) or -1. Shape ``[q]``."""
    chi = -np.ones(q, np.int8)
    chi[np.unique(np.arange(1, q) ** 2 % q)] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[i, j] = χ(j - i)`` of a prime ``q``, shape ``[q, q]``."""
    idx = np.arange(q)
    return _quadratic_character(q)[(idx[None, :] - idx[:, None]) % q]


def _conference_core(q: int) -> np.ndarray:
    """``C = [[0, 1ᵀ], [±1, Q]]`` of order ``q + 1``: ``+1`` column for ``q ≡ 1``, ``-1`` for ``q ≡ 3 (mod 4)``."""
    c = np.zeros((q + 1, q + 1), np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1 if q % 4 == 1 else -1
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley_i(q: int) -> np.ndarray:
    """Paley I, order ``q + 1`` for prime ``q ≡ 3 (mod 4)``: ``H = I + C`` with ``C`` skew."""
    return (np.eye(q + 1, dtype=np.int8) + _conference_core(q)).astype(np.int8)


def _paley_ii(q: int) -> np.ndarray:
    """Paley II, order ``2(q + 1)`` for prime ``q ≡ 1 (mod 4)``.

    ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`` with ``C`` the symmetric conference matrix.
    """
    plus = np.array([[1, 1], [1, -1]], np.int8)
    minus = np.array([[1, -1], [-1, -1]], np.int8)
    return (np.kron(_conference_core(q), plus) + np.kron(np.eye(q + 1, dtype=np.int8), minus)).astype(np.int8)


def _orbit_sequence(v: int, g: int, signs: str) -> np.ndarray:
    """First row ``[v]`` of a ±1 circulant that is constant on the orbits ``{x·g^k mod v}`` of ``Z_v``.

    Orbits are enumerated in order of their smallest element; ``signs[i]`` is the value on orbit ``i``.
    """
    row = np.zeros(v, np.int8)
    orbit = 0
    for x in range(v):
        if row[x]:
            continue
        members = {x * pow(g, k, v) % v for k in range(v)}
        row[list(members)] = 1 if signs[orbit] == "+" else -1
        orbit += 1
    if orbit != len(signs):
        raise AssertionError(f"Z_{v} under <{g}> has {orbit} orbits, expected {len(signs)}")
    return row


def _circulant(row: np.ndarray) -> np.ndarray:
    """Circulant ``A[i, j] = row[(j - i) mod v]``, shape ``[v, v]``."""
    idx = np.arange(len(row))
    return row[(idx[None, :] - idx[:, None]) % len(row)]


def _goethals_seidel(v: int, g: int, signs: tuple[str, str, str, str]) -> np.ndarray:
    """Goethals–Seidel array of order ``4v`` from circulants ``A, B, C, D`` with ``Σ XXᵀ = 4v I``.

    ``[[A, BR, CR, DR], [-BR, A, DᵀR, -CᵀR], [-CR, -DᵀR, A, BᵀR], [-DR, CᵀR, -BᵀR, A]]``,
    ``R`` the back-diagonal identity.
    """
    a, b, c, d = (_circulant(_orbit_sequence(v, g, s)) for s in signs)
    r = np.eye(v, dtype=np.int8)[::-1]
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    ).astype(np.int8)


@functools.lru_cache(maxsize=None)
def _small_hadamard(m: int) -> np.ndarray:
    """Stored ±1 Hadamard matrix of order ``m`` (``m = 1`` or in SMALL_HADAMARD_ORDERS), int8, read-only."""
    if m == 1:
        h = np.ones((1, 1), np.int8)
    elif m in _PALEY_I:
        h = _paley_i(_PALEY_I[m])
    elif m in _PALEY_II:
        h = _paley_ii(_PALEY_II[m])
    else:
        h = _goethals_seidel(*_GOETHALS_SEIDEL[m])
    h.flags.writeable = False
    return h


def _sylvester(p: int) -> np.ndarray:
    """Sylvester–Hadamard matrix ``H[i, j] = (-1)^popcount(i & j)`` of order ``p = 2^k``, int8."""
    idx = np.arange(p)
    return (1 - 2 * (np.bitwise_count(idx[:, None] & idx[None, :]) % 2)).astype(np.int8)


# ---- sizes ---------------------------------------------------------------------------------------
def _positive_int(n: int) -> int:
    """``n`` as a Python int; ValueError unless ``n ≥ 1``."""
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"a Hadamard order must be a positive integer; got n={n}")
    return n


def _factor(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m · 2^k`` and ``m`` in ``{1} ∪ SMALL_HADAMARD_ORDERS``, or None."""
    odd = n >> ((n & -n).bit_length() - 1)
    if odd == 1:
        return 1, n
    m = 4 * odd
    if m in SMALL_HADAMARD_ORDERS and n % m == 0:
        return m, n // m
    return None


def _nearest_below(n: int) -> int:
    """Largest supported order ``≤ n``."""
    best = 1
    for m in (1, *SMALL_HADAMARD_ORDERS):
        p = 1
        while m * p * 2 <= n:
            p *= 2
        if m * p <= n:
            best = max(best, m * p)
    return best


def supported_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` / :func:`fwht` support order ``n`` (``2^k`` or ``m · 2^k``)."""
    try:
        return _factor(_positive_int(n)) is not None
    except (TypeError, ValueError):
        return False


def pad_to_hadamard_size(n: int) -> int:
    """Smallest supported order ``≥ n``, for callers that zero-pad a dimension to use a Hadamard.

    E.g. ``pad_to_hadamard_size(44) == 48`` and ``pad_to_hadamard_size(11000) == 11008``.
    """
    n = _positive_int(n)
    best = None
    for m in (1, *SMALL_HADAMARD_ORDERS):
        p = 1
        while m * p < n:
            p *= 2
        best = m * p if best is None else min(best, m * p)
    return best


def hadamard_factorization(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m · 2^k``, ``H_n = H_m ⊗ H_{2^k}``; ``m = 1`` for a power of two.

    ``m`` is the smallest stored order that works (``40 -> (20, 2)``). Raises ValueError naming
    ``n`` and the nearest supported sizes when no construction exists.
    """
    n = _positive_int(n)
    factors = _factor(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order n={n} is available: supported orders are 2^k and m*2^k "
            f"for m in {SMALL_HADAMARD_ORDERS}; nearest supported sizes are {_nearest_below(n)} "
            f"and {pad_to_hadamard_size(n)} (pad_to_hadamard_size({n}) = {pad_to_hadamard_size(n)})"
        )
    return factors


# ---- matrices and the fast transform -------------------------------------------------------------
def hadamard_matrix(n: int, dtype: DTypeLike = jnp.float32, normalized: bool = True) -> jax.Array:
    """Hadamard matrix ``H_n = H_m ⊗ H_{2^k}``, shape ``[n, n]``; divided by ``√n`` when ``normalized``.

    Entries are ±1 (or ±1/√n), ``H Hᵀ = n I`` (``I`` when normalized). ``H`` is symmetric only when
    ``m`` is 1, 28 or 36.
    """
    return jnp.asarray(hadamard_numpy(n, normalized), dtype=dtype)


def hadamard_numpy(n: int, normalized: bool = True) -> np.ndarray:
    """:func:`hadamard_matrix` as a float64 numpy array (host-side merges in float64 without JAX's x64 mode)."""
    m, p = hadamard_factorization(n)
    h = np.kron(_small_hadamard(m), _sylvester(p)).astype(np.float64)
    return h / math.sqrt(n) if normalized else h


def _butterflies(y: jax.Array) -> jax.Array:
    """Unnormalised Walsh–Hadamard transform ``y H_p`` (Sylvester order) along the last axis ``p = 2^k``.

    ``log2 p`` butterfly stages ``(a, b) -> (a + b, a - b)`` on pairs ``(j, j + h)``, ``h = 1, 2, 4, …``.
    """
    *lead, p = y.shape
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(*lead, p)


def fwht(x: jax.Array, axis: int = -1, *, inverse: bool = False) -> jax.Array:
    """Orthonormal Hadamard transform of ``x`` along ``axis`` (size ``n = m · 2^k``), in ``O(n log n + n m)``.

    Row-vector convention: ``y = x H_n / √n`` (``inverse=True``: ``x = y H_nᵀ / √n``), with
    ``H_n = H_m ⊗ H_{2^k}`` exactly as :func:`hadamard_matrix` builds it. The ``2^k`` factor is done
    with reshape-based butterflies and the ``m × m`` factor with one dense contraction, so the
    function is jit-friendly. It computes in at least float32 and returns ``x.dtype`` (integers are
    promoted to float32). Shape is unchanged.
    """
    x = jnp.asarray(x)
    n = x.shape[axis]
    m, p = hadamard_factorization(n)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else compute
    y = jnp.moveaxis(x, axis, -1).astype(compute)
    lead = y.shape[:-1]
    y = _butterflies(y.reshape(*lead, m, p))
    if m > 1:
        h_m = _small_hadamard(m)
        h_m = jnp.asarray(h_m.T if inverse else h_m, compute)
        y = jnp.einsum("...ap,ac->...cp", y, h_m, precision=jax.lax.Precision.HIGHEST)
    y = y.reshape(*lead, n) * (1.0 / math.sqrt(n))
    return jnp.moveaxis(y, -1, axis).astype(out_dtype)


# ---- random orthogonal matrices ------------------------------------------------------------------
def random_hadamard(n: int, key: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Random Hadamard rotation ``diag(ε) H_n / √n``, ``ε_i`` uniform on ±1; orthogonal, shape ``[n, n]``."""
    eps = jax.random.rademacher(key, (n,), dtype=dtype)
    return eps[:, None] * hadamard_matrix(n, dtype)


def random_orthogonal(n: int, key: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Haar-random orthogonal matrix ``[n, n]``: ``Q`` of ``G = QR`` (``G`` Gaussian) with columns
    multiplied by ``sign(diag R)`` so the distribution is uniform."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), dtype))
    return q * jnp.where(jnp.diagonal(r) >= 0, 1, -1).astype(dtype)[None, :]
