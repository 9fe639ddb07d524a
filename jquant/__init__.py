"""jquant: make generative models cheap to run, in JAX."""

from jquant import ops as ops

__version__ = "0.1.0"
__all__ = ["ops"]
