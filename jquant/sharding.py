"""Placing models on a ``jax.sharding.Mesh`` from the logical axis names their parameters carry.

Model parameters are annotated with logical names (``vocab``, ``embed``,
``heads``, ``kv``, ``mlp``, ``norm``, ``expert``; see ``jquant.models.layers``).  A rules
table maps each logical name to a mesh axis (or ``None``: replicated); the
default is Megatron-style tensor parallelism over a ``"model"`` axis, with
the batch split over ``"data"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": None,
    "embed": None,
    "heads": "model",
    "kv": "model",
    "mlp": "model",
    "norm": None,
    "expert": None,
}


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None if unannotated)."""
    return variable.get_metadata().get("out_sharding")


def partition_specs(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> nnx.State:
    """A ``PartitionSpec`` per parameter of ``model`` (replicated where an axis does not divide).

    Raises if a rule names a mesh axis the mesh lacks.
    """
    specs = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = logical_names(var) or (None,) * var[...].ndim
        axes = []
        for dim, name in zip(var[...].shape, names):
            axis = rules.get(name) if name is not None else None
            if axis is not None and axis not in mesh.shape:
                raise ValueError(f"sharding rule {name!r} -> {axis!r}: the mesh has axes {tuple(mesh.shape)}, not {axis!r}.")
            axes.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
        specs.append((path, var.replace(PartitionSpec(*axes))))
    return nnx.from_flat_state(specs)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> nnx.Module:
    """A copy of ``model`` whose arrays are placed on ``mesh`` by ``rules`` (the input is untouched)."""
    graphdef, state = nnx.split(model)
    specs = partition_specs(model, mesh, rules)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def shard_batch(tokens: jax.Array, mesh: Mesh, axis: str = "data") -> jax.Array:
    """``tokens [B, ...]`` split over the mesh's ``axis`` along the batch dimension."""
    if tokens.shape[0] % mesh.shape[axis]:
        raise ValueError(f"batch size {tokens.shape[0]} is not divisible by mesh axis {axis!r} of size {mesh.shape[axis]}.")
    return jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(axis)))



def restore_uncommitted(restore: Callable[[], Any], *, like=None):
    """The tree ``restore()`` returns (NumPy or device arrays), its arrays uncommitted on the default device as a
    freshly built model's are; with ``like`` (a tree of the same structure) only where ``like``'s array is
    uncommitted (sharded, committed arrays stay as restored).

    Orbax's restore commits every array to its device, and jit compiles again for committed inputs: a loaded
    model or a resumed training run would not reuse the programs already compiled (nor the persistent cache's).
    The tree is restored here so that nothing else holds it, and each leaf's source is dropped once converted
    (measured on CPU, a 0.28 GB float32 Llama's load peaks about 0.15 GB above orbax's committed restore; a NumPy
    restore followed by the copy peaked about 0.4 GB above it).
    """
    leaves, treedef = jax.tree.flatten(restore())
    keep = [False] * len(leaves) if like is None else [
        isinstance(a, jax.Array) and a.committed for a in treedef.flatten_up_to(like)]
    for i, committed in enumerate(keep):
        if not committed:
            leaves[i] = jnp.asarray(np.asarray(leaves[i]))  # np.asarray: the host value (zero-copy on CPU)
    return jax.tree.unflatten(treedef, leaves)
