"""CPU time of GPTQ on one 4096x4096 layer (int4, groups of 128) with a random correlated Hessian.

    python experiments/gptq_timing.py

Prints the wall time of the first call (includes compilation) and of a second
call on a new weight of the same shape (compiled code reused).
"""

import time

import jax
import numpy as np

from jquant.algorithms.weights import gptq_weight
from jquant.calib.capture import InputStatistics
from jquant.formats import get_format

N = 4096


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 256)).astype(np.float32) @ rng.normal(size=(256, N)).astype(np.float32)
    x += 0.1 * rng.normal(size=x.shape).astype(np.float32)
    stats = InputStatistics(hessian=(x.T @ x).astype(np.float64), count=float(len(x)), absmax=np.abs(x).max(0))
    fmt = get_format("int4-g128-asym")
    for attempt in ("first call (with compilation)", "second call (compiled)"):
        w = jax.numpy.asarray(rng.normal(size=(N, N)).astype(np.float32) * 0.02)
        t0 = time.perf_counter()
        q = gptq_weight(w, fmt, axis=0, stats=stats)
        jax.block_until_ready(q)
        print(f"GPTQ {N}x{N} int4-g128 on {jax.devices()[0].platform} ({attempt}): {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
