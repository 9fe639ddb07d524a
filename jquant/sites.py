"""Quantization sites: the weights a model family declares quantizable, found without knowing the family.

A module class declares itself a site with a class attribute
``QUANT_SITE = SiteSpec(param=..., contraction_axis=..., kind=...)``.
``find_sites(model)`` walks the NNX graph and returns every such module with
its path (``layers/3/self_attn/q_proj``), so algorithms and recipes work from
paths and specs and never import a model family. MoE expert stacks
``[E, in, out]`` declare ``contraction_axis=1``; element-wise or convolution
weights declare their own axis and kind.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from flax import nnx

SiteKind = Literal["linear", "embedding", "experts", "elementwise", "conv", "depthwise"]


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """What a site module exposes: the attribute holding its weight, the weight's contraction axis, its kind."""

    param: str
    contraction_axis: int
    kind: SiteKind


@dataclasses.dataclass(frozen=True)
class Site:
    """A quantizable weight found in a model: ``path`` (``/``-joined module path), the module and its spec."""

    path: str
    module: nnx.Module
    spec: SiteSpec

    @property
    def weight(self) -> nnx.Variable:
        return getattr(self.module, self.spec.param)


def path_string(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def find_sites(model: nnx.Module) -> list[Site]:
    """Every module of ``model`` whose class declares ``QUANT_SITE``, in graph order."""
    sites = []
    for path, node in nnx.iter_graph(model):
        spec = getattr(type(node), "QUANT_SITE", None)
        if isinstance(node, nnx.Module) and isinstance(spec, SiteSpec):
            sites.append(Site(path=path_string(path), module=node, spec=spec))
    return sites


@dataclasses.dataclass(frozen=True)
class ActivationGroups:
    """How a family's tokens fall into groups for calibration statistics and activation quantization.

    ``names``: one per group id (``("text", "image")`` for an MLLM's modalities, ``("t0", "t1", "t2")``
    for a diffusion model's timestep buckets). ``sites``: a regex of the site paths whose calls pass
    group ids (``Linear(x, groups=ids)``); only those can hold per-group activation formats and static
    scales. A model declares them with an ``activation_groups()`` method.
    """

    names: tuple[str, ...]
    sites: str = ".*"

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"ActivationGroups.names must be distinct and non-empty, got {self.names}.")

    def covers(self, path: str) -> bool:
        """Whether site ``path`` receives group ids."""
        return re.fullmatch(self.sites, path) is not None


def activation_groups(model: nnx.Module) -> ActivationGroups | None:
    """The groups ``model`` declares (``model.activation_groups()``), or None."""
    declare = getattr(model, "activation_groups", None)
    return None if declare is None else declare()
