"""``NamedRegistry``: spec objects looked up by name, with errors that name the kind and list the known names.

The weight algorithms (``jquant.algorithms.weights``) and the transform steps (``jquant.transforms.registry``)
each keep one; recipes validate names against them and users add their own with ``register``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Spec = TypeVar("Spec")


class NamedRegistry(Generic[Spec]):
    """Specs by name, in registration order; ``kind`` words the errors ("weight algorithm", "transform")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, Spec] = {}

    def register(self, name: str, spec: Spec) -> Spec:
        """Add ``spec`` under ``name``; registering the same spec again is a no-op, another one is refused."""
        if self._specs.get(name, spec) is not spec:
            raise ValueError(f"a {self.kind} named {name!r} is already registered; give yours another name.")
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> Spec:
        if name not in self._specs:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._specs)}.")
        return self._specs[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)
