"""Sanity check of the device timing used by the kernel benchmark (run on the GPU machine).

    python experiments/device_timing_check.py

Prints the GPU planes and lines of a profiler trace with the stats of a few kernel
events (so the ``hlo_module`` attribution in ``jquant.device_timing`` can be checked),
then times a bf16 ``jnp.dot`` at M = 1 on 4096x4096 over 8 weight copies three ways:
device kernel time, device span, and wall clock per call. The HBM floor of that GEMV
is 32 MiB / bandwidth (about 11-13 us on an H100).
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jquant import benchmark as B  # noqa: E402
from jquant.device_timing import tagged_jit  # noqa: E402


def dump_trace() -> None:
    x = jnp.ones((1, 4096), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(0), (4096, 4096), jnp.bfloat16)
    f, module = tagged_jit(lambda x, w: jnp.dot(x, w) + 1)
    jax.block_until_ready(f(x, w))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(2):
            jax.block_until_ready(f(x, w))
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        print(f"module {module}")
        for plane in data.planes:
            if not plane.name.startswith("/device"):
                continue
            for line in plane.lines:
                evs = list(line.events)
                print(f"{plane.name} | line {line.name!r}: {len(evs)} events")
                for ev in evs[:3]:
                    print(f"    {ev.name[:70]!r} {ev.duration_ns:.0f} ns stats={[(k, str(v)[:40]) for k, v in ev.stats][:8]}")


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    dump_trace()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4096), jnp.bfloat16)
    ws = B.weight_sets(None, 4096, 4096, 8, jax.random.PRNGKey(2))
    t = B.time_jobs([(lambda x, w: jnp.dot(x, w), x, ws)], 10)[0]
    wall = B.median_time(jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws]), (x, ws), 10) / len(ws)
    print(f"bf16 4096x4096 M=1: device {t.seconds * 1e6:.1f} us, span {t.span_seconds * 1e6:.1f} us, "
          f"wall {wall * 1e6:.1f} us per call; kernels {t.kernels}", flush=True)
    print("ceilings", B.measure_ceilings(), flush=True)


if __name__ == "__main__":
    main()
