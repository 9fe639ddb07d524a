"""Memory accounting of a fine-tuning step (GSQ-Tuning spec §6), measured from the arrays.

- ``frozen_weights``: every non-adapter array of the model as stored (NF4 ``QArray``
  codes and scales, or 16-bit kernels; embeddings, norms and the head included);
- ``adapters``: the FP32 LoRA masters;
- ``optimizer``: the optimizer state (AdamW: two FP32 moments per adapter weight);
- ``saved_activations``: the residuals the backward pass keeps for one batch: the
  outputs of ``jax.vjp``'s forward that are not inputs or constants (what
  ``jax.ad_checkpoint.print_saved_residuals`` lists), traced, not run. Under ``jit``
  XLA may fuse or rematerialise some of them; this is the autodiff program's count.

Shared-exponent formats keep their packed codes and int8 exponents in the residuals
when ``LoRAArithmetic.saved == "quantized"``, so their saving shows up here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jquant.finetune.lora import LoRAParam


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    """Bytes per part of one fine-tuning step."""

    frozen_weights: int
    adapters: int
    optimizer: int
    saved_activations: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.adapters + self.optimizer + self.saved_activations

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def saved_residual_bytes(fn: Callable, params, *others) -> int:
    """Bytes of the residuals ``jax.vjp`` of ``fn(params, *others)`` with respect to ``params`` keeps.

    Residuals that are the inputs themselves (``params``, ``others``) or constants are not counted.
    """
    leaves, tree = jax.tree.flatten((params, others))

    def forward(*flat):
        p, rest = jax.tree.unflatten(tree, flat)
        return jax.vjp(lambda q: fn(q, *rest), p)[1]

    jaxpr = jax.make_jaxpr(forward)(*leaves).jaxpr
    excluded = set(jaxpr.invars) | set(jaxpr.constvars)
    seen, total = set(), 0
    for v in jaxpr.outvars:
        if hasattr(v, "val") or v in excluded or v in seen:  # literals, inputs, constants
            continue
        seen.add(v)
        dtype = v.aval.dtype
        if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += int(np.prod(v.aval.shape)) * np.dtype(dtype).itemsize
    return total


def training_memory(model: nnx.Module, optimizer: nnx.Optimizer | None,
                    loss: Callable[[nnx.Module], jax.Array]) -> TrainingMemory:
    """Measures ``model``'s fine-tuning memory for the batch ``loss`` closes over.

    ``loss(model) -> scalar`` is differentiated with respect to the adapters only.
    """
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("training_memory: the model has no LoRA adapters (add_lora adds them).")

    def of_adapters(lora_state, rest_state):
        return loss(nnx.merge(graphdef, lora_state, rest_state))

    return TrainingMemory(
        frozen_weights=_nbytes(rest),
        adapters=_nbytes(lora),
        optimizer=0 if optimizer is None else _nbytes(nnx.state(optimizer)),
        saved_activations=saved_residual_bytes(of_adapters, lora, rest),
    )
