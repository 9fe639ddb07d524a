"""Moving a model's parameters to and from a checkpoint's named tensors (diffusers families share this).

A family describes each parameter once: ``{state path: (tensor name, convert)}``, where ``convert`` maps the
stored layout to jquant's on import (a PyTorch ``[out, in]`` weight transposed, a conv weight to its matrix view)
or back on export; an import entry may add the stored shape the config implies, ``(name, convert, shape)``,
so a mis-shaped tensor is reported in the checkpoint's own layout. ``load_parameters`` checks every tensor (none missing, none left over, floating, the shape the
config implies) before building anything; ``export_parameters`` refuses quantized weights (checkpoint formats of
other libraries hold float tensors).

Modules whose PyTorch names are their own paths (the diffusers autoencoders) describe themselves with
``torch_layouts``: each parameter's name (the module path joined by ``.``, ``kernel`` -> ``weight``) and layout
(``Layout``); ``import_torch_tensors`` / ``export_torch_tensors`` then convert by layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.formats import QArray
from jquant.models.layers import Conv, Linear

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


Layout = tuple[str, tuple[int, ...]]
"""How PyTorch stores a parameter: ``("same", ())`` as jquant does; ``("linear", ())`` transposed (``[out, in]``);
``("conv", kernel)`` a convolution ``[C_out, C_in, *kernel]`` (jquant: the ``[K C_in, C_out]`` matrix view);
``("channel", ones)`` a per-channel vector with trailing unit axes (``[C, *ones]``, e.g. Wan's RMS-norm gammas)."""
SAME: Layout = ("same", ())


def torch_layouts(model: nnx.Module, *, special: Callable[[Any], Mapping[str, Layout]] | None = None,
                  rename: Callable[[str], str] = str) -> dict[Path, tuple[str, Layout]]:
    """Parameter path -> ``(PyTorch name, layout)`` for a module whose PyTorch names are its own paths: ``Conv``
    kernels are ``("conv", kernel_size)``, ``Linear`` kernels ``("linear", ())``, anything else ``SAME`` unless
    ``special(node)`` gives a module's ``{parameter: layout}``; ``rename`` maps each path element to its PyTorch
    name."""
    layouts: dict[Path, Layout] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Conv):
            layouts[(*path, "kernel")] = ("conv", tuple(node.kernel_size))
        elif isinstance(node, Linear):
            layouts[(*path, "kernel")] = ("linear", ())
        elif special is not None:
            layouts.update({(*path, leaf): layout for leaf, layout in special(node).items()})
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, leaf = path
        name = ".".join([*(rename(str(p)) for p in module), "weight" if leaf == "kernel" else str(leaf)])
        out[path] = (name, layouts.get(tuple(path), SAME))
    return out


def from_torch(array: np.ndarray, layout: Layout) -> np.ndarray:
    """A stored PyTorch tensor in jquant's layout (``Layout``)."""
    kind, _ = layout
    if kind == "conv":  # [C_out, C_in, *k] -> [*k, C_in, C_out] -> [K C_in, C_out]
        return np.moveaxis(array, (0, 1), (-1, -2)).reshape(-1, array.shape[0])
    if kind == "linear":
        return array.T
    return array.reshape(-1) if kind == "channel" else array


def to_torch(array: np.ndarray, layout: Layout) -> np.ndarray:
    """A jquant parameter in PyTorch's layout (the inverse of ``from_torch``)."""
    kind, suffix = layout
    if kind == "conv":
        rows, c_out = array.shape
        return np.moveaxis(array.reshape(*suffix, rows // math.prod(suffix), c_out), (-1, -2), (0, 1))
    if kind == "linear":
        return array.T
    return array.reshape(-1, *suffix) if kind == "channel" else array


def torch_shape(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The PyTorch shape of a jquant parameter of ``shape`` (what a checkpoint of this config must hold)."""
    kind, suffix = layout
    if kind == "conv":
        rows, c_out = shape
        return (c_out, rows // math.prod(suffix), *suffix)
    if kind == "linear":
        return tuple(shape[::-1])
    return (*shape, *suffix) if kind == "channel" else tuple(shape)


def import_torch_tensors(abstract: nnx.Module, tensors: Mapping[str, np.ndarray],
                         layouts: Mapping[Path, tuple[str, Layout]], *, param_dtype: str, source: str,
                         what: str) -> nnx.Module:
    """``load_parameters`` with the entries of ``layouts`` (``torch_layouts`` of ``abstract``)."""
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(abstract))}
    entries = {path: (name, functools.partial(from_torch, layout=layout), torch_shape(shapes[path], layout))
               for path, (name, layout) in layouts.items()}
    return load_parameters(abstract, entries, tensors, param_dtype=param_dtype, source=source, what=what)


def export_torch_tensors(model: nnx.Module, layouts: Mapping[Path, tuple[str, Layout]]) -> dict[str, np.ndarray]:
    """``export_parameters`` with the entries of ``layouts`` (``torch_layouts`` of ``model``)."""
    entries = {path: (name, functools.partial(to_torch, layout=layout)) for path, (name, layout) in layouts.items()}
    return export_parameters(model, entries)
