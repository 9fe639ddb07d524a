"""Moving a model's parameters to and from a checkpoint's named tensors (diffusers families share this).

A family describes each parameter once: ``{state path: (tensor name, convert)}``, where ``convert`` maps the
stored layout to jquant's on import (a PyTorch ``[out, in]`` weight transposed, a conv weight to its matrix view)
or back on export; an import entry may add the stored shape the config implies, ``(name, convert, shape)``,
so a mis-shaped tensor is reported in the checkpoint's own layout. ``load_parameters`` checks every tensor (none missing, none left over, floating, the shape the
config implies) before building anything; ``export_parameters`` refuses quantized weights (checkpoint formats of
other libraries hold float tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import QArray

Path = tuple  # an nnx state path
Convert = Callable[[np.ndarray], np.ndarray]


def load_parameters(abstract: nnx.Module, entries: Mapping[Path, tuple],
                    tensors: Mapping[str, np.ndarray], *, param_dtype: str, source: str, what: str) -> nnx.Module:
    """A model with ``abstract``'s structure holding ``tensors`` (converted per ``entries``; every parameter of
    ``abstract`` must have an entry). ``what`` names the architecture in errors."""
    graphdef, state = nnx.split(abstract)
    remaining = dict(tensors)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path not in entries:
            raise KeyError(f"{what}: no checkpoint tensor is declared for parameter {'/'.join(map(str, path))}.")
        name, convert, *stored_shape = entries[path]
        if name not in remaining:
            raise ValueError(f"{source}: tensor {name!r} is missing ({what} of this config needs it).")
        array = np.asarray(remaining.pop(name))
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"{source}: tensor {name!r} has dtype {array.dtype}; a floating-point tensor was expected.")
        if stored_shape and tuple(array.shape) != tuple(stored_shape[0]):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies "
                             f"{tuple(stored_shape[0])}.")
        try:
            value = convert(array)
        except (ValueError, IndexError, np.exceptions.AxisError):
            value = None
        if value is None or tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, which does not fit the config "
                             f"(expected {tuple(var.shape)} after conversion).")
        flat.append((path, var.replace(jnp.asarray(value, dtype=jnp.dtype(param_dtype)))))
    if remaining:
        raise ValueError(f"{source}: unexpected tensors not used by a {what} of this config (another variant or "
                         f"architecture): {sorted(remaining)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_parameters(model: nnx.Module, entries: Mapping[Path, tuple[str, Convert]]) -> dict[str, np.ndarray]:
    """The named tensors of a float ``model`` (converted per ``entries``); a quantized weight is refused."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, convert = entries[path]
        value = var.get_value()
        if isinstance(value, QArray):
            raise ValueError(f"export: {'/'.join(map(str, path[:-1]))} holds a quantized weight; this checkpoint "
                             "format holds float tensors: export the float model, or save with jquant.save.")
        out[name] = np.ascontiguousarray(convert(np.asarray(value)))
    return out
