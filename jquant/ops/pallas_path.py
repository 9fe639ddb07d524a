"""The bridge from ``jquant.ops.dispatch`` to the Pallas kernels of ``jquant.pallas_kernels``.

``choose`` returns a ``dispatch.Kernel`` that flattens ``x [..., K]`` to ``[M, K]``, runs
the chosen kernel with the chosen tile config and adds the bias, or ``None`` (with the
reason) when the XLA path should run: mode ``"auto"`` off-GPU, a static activation
scale (the kernels quantize activations dynamically), an unsupported format pair,
a shape that does not tile, or a measured table entry where XLA was faster.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jquant.ops.kernel import Kernel

FAST_DTYPES = (jnp.bfloat16, jnp.float16)


def _kernel(spec, cfg) -> Kernel:
    def apply(x, w, b, activation):
        x2 = x.reshape(-1, x.shape[-1])
        y = spec.run(x2, w, activation, cfg).reshape(*x.shape[:-1], w.shape[-1])
        return y if b is None else y + b.astype(y.dtype)

    return Kernel(spec.name, lambda x, w, a: True, apply)


def choose(x, w, activation, activation_scale, mode: str) -> tuple[Kernel | None, str]:
    from jquant.pallas_kernels import registry

    if activation_scale is not None:
        return None, "static activation scale: the kernels quantize activations per token"
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        return None, "only 2-D [K, N] weights matching x go to kernels"
    m, (k, n) = math.prod(x.shape[:-1]), w.shape
    if mode == "auto":
        if jax.default_backend() != "gpu":
            return None, f"mode 'auto' on backend {jax.default_backend()!r}: kernels run on GPUs only"
        if x.dtype not in FAST_DTYPES:
            return None, f"activations are {x.dtype}; kernels are used for bfloat16/float16"
        decision = registry.decide(w, activation, m, k, n)
        if decision.kernel is None:
            return None, decision.reason
        spec, configs = registry.get(decision.kernel), [decision.config]
    else:
        spec = registry.kernel_for(w, activation)
        if spec is None:
            return None, f"no kernel for weight {w.format.name} with activation " \
                         f"{getattr(activation, 'name', None)}"
        configs = registry.candidate_configs(spec.name, m)
    problems = []
    for cfg in configs:  # the first config the shape tiles with
        try:
            spec.check(jax.ShapeDtypeStruct((m, k), x.dtype), w, activation, cfg)
        except (ValueError, TypeError) as e:
            problems.append(str(e))
            continue
        return _kernel(spec, cfg), f"mode {mode!r}: {spec.name} with {cfg}"
    if not problems:
        return None, f"{spec.name} has no tile config for M={m}"
    return None, f"{spec.name} does not apply: {problems[0]}"
