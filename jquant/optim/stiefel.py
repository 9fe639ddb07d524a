"""Riemannian optimisers on the Stiefel manifold, as optax transforms (OSTQuant spec §3.6).

A point is a matrix ``X [..., n, p]`` with ``p <= n`` and ``XᵀX = I`` (square: an orthogonal matrix). Leading
axes are a batch of independent points, e.g. one rotation per KV head ``[h, d_h, d_h]``. The metric is the
canonical one, as in geoopt's default ``Stiefel()``:

    tangent projection / Riemannian gradient   r = G − X Gᵀ X
    inner product                              ⟨u, u⟩_X = ‖u‖² − ½‖Xᵀu‖²   (Frobenius norms)
    Cayley retraction along ξ                  A = ξXᵀ − Xξᵀ,  X' = (I − A/2)⁻¹ (I + A/2) X
    vector transport along the same step       m' = (I − A/2)⁻¹ (I + A/2) m
    stabilisation (every ``stabilize`` steps)  X ← U Vᵀ (thin SVD X = U S Vᵀ),  m ← m − X mᵀ X

A retraction needs the current point, so ``update(grads, state, params)`` requires ``params`` and returns
``X' − X``: ``optax.apply_updates(params, updates)`` gives ``X'`` up to one rounding.
Maths runs in at least float32; updates are cast back to the parameter dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

ROTATION_LR = 0.01689753172873217
"""OSTQuant's rotation learning rate (code default, NAS on LLaMA-3-8B)."""
SCALE_LR = 0.0017898822675917248
"""OSTQuant's smoothing-scale learning rate (code default)."""

SecondMoment = Literal["canonical", "elementwise"]


def _mT(x: jax.Array) -> jax.Array:
    """Transpose of the last two axes: ``[..., n, p]`` -> ``[..., p, n]``."""
    return jnp.swapaxes(x, -1, -2)


def project_tangent(x: jax.Array, u: jax.Array) -> jax.Array:
    """Canonical tangent projection at ``x``, also the Riemannian gradient: ``u − X uᵀ X``.

    Shapes: ``x, u [..., n, p]`` -> ``[..., n, p]``. ``Xᵀ(result)`` is skew-symmetric when ``XᵀX = I``.
    """
    return u - x @ _mT(u) @ x


def canonical_sq_norm(x: jax.Array, u: jax.Array) -> jax.Array:
    """Canonical squared norm of a tangent vector, ``‖u‖² − ½‖Xᵀu‖²``, per matrix.

    Shapes: ``x, u [..., n, p]`` -> ``[..., 1, 1]`` (kept axes broadcast against the matrices).
    """
    xtu = _mT(x) @ u
    return jnp.sum(u * u, axis=(-2, -1), keepdims=True) - 0.5 * jnp.sum(xtu * xtu, axis=(-2, -1), keepdims=True)


def cayley_retract(x: jax.Array, xi: jax.Array, *vectors: jax.Array) -> tuple[jax.Array, ...]:
    """Cayley retraction of ``x`` along ``xi``, carrying ``vectors`` along with the same map.

    ``A = ξXᵀ − Xξᵀ [..., n, n]`` (skew), ``Q = (I − A/2)⁻¹ (I + A/2)`` (orthogonal); returns
    ``(Q X, Q v₁, Q v₂, ...)``. One linear solve with the right-hand sides concatenated, as geoopt does.
    Shapes: ``x, xi, v [..., n, p]``.
    """
    a = xi @ _mT(x) - x @ _mT(xi)
    eye = jnp.eye(x.shape[-2], dtype=x.dtype)
    rhs = jnp.concatenate((x, *vectors), axis=-1)
    out = jnp.linalg.solve(eye - 0.5 * a, rhs + 0.5 * (a @ rhs))
    p = x.shape[-1]
    return tuple(out[..., i * p:(i + 1) * p] for i in range(1 + len(vectors)))


def project_to_stiefel(x: jax.Array) -> jax.Array:
    """Nearest point on the manifold in Frobenius norm: ``U Vᵀ`` from the thin SVD ``x = U S Vᵀ``.

    Shapes: ``[..., n, p]`` -> ``[..., n, p]``.
    """
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    return u @ vt


def _stabilized(x: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-project the point (``U Vᵀ``) and then the momentum onto the new tangent space."""
    x = project_to_stiefel(x)
    return x, project_tangent(x, m)


def _maybe_stabilize(x: jax.Array, m: jax.Array, count: jax.Array,
                     stabilize: int | None) -> tuple[jax.Array, jax.Array]:
    """Apply ``_stabilized`` when ``count % stabilize == 0`` (never when ``stabilize`` is None)."""
    if stabilize is None:
        return x, m
    return jax.lax.cond(count % stabilize == 0, _stabilized, lambda a, b: (a, b), x, m)


def _compute_dtype(leaf: jax.Array) -> jnp.dtype:
    """The optimiser's working dtype for a leaf: at least float32."""
    return jnp.promote_types(leaf.dtype, jnp.float32)


def _check_points(params: optax.Params) -> None:
    """Every leaf must be ``[..., n, p]`` with ``p <= n``."""
    for path, leaf in jax.tree.flatten_with_path(params)[0]:
        shape = jnp.shape(leaf)
        if len(shape) < 2 or shape[-1] > shape[-2]:
            raise ValueError(f"Stiefel parameter {jax.tree_util.keystr(path)} must have shape [..., n, p] with "
                             f"p <= n, got {shape}.")


def _learning_rate(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """The rate for the step that ``count`` (0-based, before increment) is about to take."""
    return jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate)


def _require_params(params: optax.Params | None, name: str) -> optax.Params:
    """``params``, or a clear error when an update is called without them."""
    if params is None:
        raise ValueError(f"{name}.update needs params: a retraction moves from the current point.")
    return params


def _per_leaf(fn: Callable[..., tuple], n_out: int, first: Any, *others: Any) -> tuple:
    """Map ``fn`` over matching leaves of several trees; unzip its ``n_out``-tuple outputs into trees."""
    out = jax.tree.map(fn, first, *others)
    return tuple(jax.tree.map(lambda _, o, i=i: o[i], first, out) for i in range(n_out))


class RiemannianAdamState(NamedTuple):
    """``count`` steps taken (int32 []); ``mu`` the transported first moment (like params); ``nu`` the second
    moment: ``[..., 1, 1]`` per matrix for the canonical variant, like params for the element-wise one."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def riemannian_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    stabilize: int | None = 10,
                    second_moment: SecondMoment = "canonical") -> optax.GradientTransformationExtraArgs:
    """geoopt's ``RiemannianAdam`` (no weight decay, no AMSGrad) on the canonical Stiefel manifold.

    Per step ``t`` (1-based), for each point ``X`` with Euclidean gradient ``G``::

        r = G − X Gᵀ X
        m ← b1 m + (1 − b1) r
        v ← b2 v + (1 − b2) s          s = ⟨r, r⟩_X = ‖r‖² − ½‖Xᵀr‖²  (canonical: one number per matrix)
                                       s = r ⊙ r                        (elementwise)
        u = (m / (1 − b1ᵗ)) / (sqrt(v / (1 − b2ᵗ)) + eps)
        X, m ← Cayley retraction of X along ξ = −lr·u, transporting m
        every ``stabilize`` steps: X ← U Vᵀ, m ← m − X mᵀ X

    ``second_moment="canonical"`` is what geoopt computes (its ``component_inner`` on a Stiefel manifold is
    the metric inner product, broadcast over the matrix), so each step has canonical norm about ``lr``
    whatever ``n``. The spec's §3.6 text writes the element-wise ``r ⊙ r``, which is plain Adam's
    normalisation and takes steps about ``sqrt(n p)`` times larger; it is kept as an option.

    ``learning_rate`` is a float or an optax schedule of the 0-based step count. Leaves of ``params`` are
    ``[..., n, p]`` with ``p <= n``; ``update`` requires ``params`` and returns ``X_new − X``.
    """
    if second_moment not in ("canonical", "elementwise"):
        raise ValueError(f"second_moment must be 'canonical' or 'elementwise', got {second_moment!r}.")

    def init_fn(params: optax.Params) -> RiemannianAdamState:
        _check_points(params)

        def nu_like(p):
            shape = p.shape[:-2] + (1, 1) if second_moment == "canonical" else p.shape
            return jnp.zeros(shape, _compute_dtype(p))

        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, _compute_dtype(p)), params)
        return RiemannianAdamState(jnp.zeros([], jnp.int32), mu, jax.tree.map(nu_like, params))

    def update_fn(grads: optax.Updates, state: RiemannianAdamState, params: optax.Params | None = None,
                  **extra_args: Any) -> tuple[optax.Updates, RiemannianAdamState]:
        del extra_args
        params = _require_params(params, "riemannian_adam")
        lr = _learning_rate(learning_rate, state.count)
        count = optax.safe_increment(state.count)

        def step(p, g, m, v):
            x, g = p.astype(m.dtype), g.astype(m.dtype)
            r = project_tangent(x, g)
            m = b1 * m + (1 - b1) * r
            v = b2 * v + (1 - b2) * (canonical_sq_norm(x, r) if second_moment == "canonical" else r * r)
            t = count.astype(m.dtype)
            direction = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
            x_new, m = cayley_retract(x, -lr.astype(m.dtype) * direction, m)
            x_new, m = _maybe_stabilize(x_new, m, count, stabilize)
            return (x_new - x).astype(p.dtype), m, v

        updates, mu, nu = _per_leaf(step, 3, params, grads, state.mu, state.nu)
        return updates, RiemannianAdamState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class CayleySGDState(NamedTuple):
    """``count`` steps taken (int32 []); ``momentum`` the transported momentum buffer (like params)."""

    count: jax.Array
    momentum: optax.Updates


def cayley_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.0,
               stabilize: int | None = 10) -> optax.GradientTransformationExtraArgs:
    """Riemannian SGD with heavy-ball momentum and the Cayley retraction (canonical Stiefel metric).

    Per step, for each point ``X`` with Euclidean gradient ``G`` (``m`` starts at 0)::

        r = G − X Gᵀ X
        m ← momentum · m + r
        X, m ← Cayley retraction of X along ξ = −lr·m, transporting m
        every ``stabilize`` steps: X ← U Vᵀ, m ← m − X mᵀ X

    With ``momentum=0`` this is geoopt's ``RiemannianSGD`` step exactly. (With momentum, geoopt seeds the
    buffer with the Euclidean gradient; here it starts at 0 as in ``torch.optim.SGD``'s first step.)
    ``update`` requires ``params`` and returns ``X_new − X``.
    """
    if momentum < 0:
        raise ValueError(f"momentum must be >= 0, got {momentum}.")

    def init_fn(params: optax.Params) -> CayleySGDState:
        _check_points(params)
        buffers = jax.tree.map(lambda p: jnp.zeros(p.shape, _compute_dtype(p)), params)
        return CayleySGDState(jnp.zeros([], jnp.int32), buffers)

    def update_fn(grads: optax.Updates, state: CayleySGDState, params: optax.Params | None = None,
                  **extra_args: Any) -> tuple[optax.Updates, CayleySGDState]:
        del extra_args
        params = _require_params(params, "cayley_sgd")
        lr = _learning_rate(learning_rate, state.count)
        count = optax.safe_increment(state.count)

        def step(p, g, m):
            x, g = p.astype(m.dtype), g.astype(m.dtype)
            m = momentum * m + project_tangent(x, g)
            x_new, m = cayley_retract(x, -lr.astype(m.dtype) * m, m)
            x_new, m = _maybe_stabilize(x_new, m, count, stabilize)
            return (x_new - x).astype(p.dtype), m

        updates, buffers = _per_leaf(step, 2, params, grads, state.momentum)
        return updates, CayleySGDState(count, buffers)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stiefel_labels(params: optax.Params) -> Any:
    """Default OSTQuant grouping: ``"rotation"`` for leaves with ``ndim >= 2``, ``"scale"`` otherwise."""
    return jax.tree.map(lambda p: "rotation" if jnp.ndim(p) >= 2 else "scale", params)


def ostquant_optimizer(total_steps: int, *, rotation_lr: float = ROTATION_LR, scale_lr: float = SCALE_LR,
                       labels: Callable[[optax.Params], Any] | Any = stiefel_labels, b1: float = 0.9,
                       b2: float = 0.999, eps: float = 1e-8, stabilize: int | None = 10,
                       rotation: str = "riemannian_adam") -> optax.GradientTransformationExtraArgs:
    """OSTQuant's optimiser: Riemannian Adam on rotations, Adam on scales, both under cosine decay to 0.

    ``rotation="cayley_sgd"``: SpinQuant's Cayley SGD on the rotations instead (no momentum, the rate decaying
    linearly from ``rotation_lr`` to 0 over ``total_steps``).

    ``labels`` is a function of the params (or a pytree, possibly a prefix) giving ``"rotation"`` or
    ``"scale"`` per leaf; the default labels every leaf with ``ndim >= 2`` a rotation. The rate at 0-based step
    ``t`` is ``lr · ½(1 + cos(π t / total_steps))``. ``update`` requires ``params``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if rotation == "riemannian_adam":
        rotations = riemannian_adam(optax.cosine_decay_schedule(rotation_lr, total_steps), b1, b2, eps, stabilize)
    elif rotation == "cayley_sgd":
        rotations = cayley_sgd(optax.linear_schedule(rotation_lr, 0.0, total_steps), stabilize=stabilize)
    else:
        raise ValueError(f"rotation must be 'riemannian_adam' or 'cayley_sgd', got {rotation!r}.")
    scale = optax.adam(optax.cosine_decay_schedule(scale_lr, total_steps), b1, b2, eps)
    return optax.multi_transform({"rotation": rotations, "scale": scale}, labels)
