"""Where W8A8 prefill time goes: XLA int8 GEMM variants against bf16 (run on the GPU machine).

    python experiments/w8a8_prefill_paths.py [--shapes 14336x4096] [--m 1024,4096,8192] [--out FILE.json]

For each shape and M it times (device kernel time, ``jquant.device_timing``) and breaks
down by kernel:

- ``bf16``: ``jnp.dot`` of bf16 ``x [M, K]`` and ``w [K, N]``;
- ``native``: ``xla_native_dot`` (per-token int8 quantization of x, then an
  s8 x s8 -> s32 ``dot_general`` of the stored ``[K, N]`` codes, scaled epilogue);
- ``int8-kn``: the int8 ``dot_general`` alone on pre-quantized x and ``[K, N]`` codes;
- ``int8-nk``: the same on codes transposed once to ``[N, K]`` (both operands K-major,
  the layout cuBLASLt's int8 IMMA wants);
- ``native-nk``: ``native`` with the ``[N, K]`` codes.

Run it under different ``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_triton_gemm=false``) to
compare XLA's GEMM back ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jquant import benchmark as B  # noqa: E402
from jquant.formats import get_format, quantize  # noqa: E402
from jquant.pallas_kernels import xla_native_dot  # noqa: E402


def int8_dot(xq, codes, contract_w: int):
    return jax.lax.dot_general(xq, codes, (((1,), (contract_w,)), ((), ())), preferred_element_type=jnp.int32)


def native_nk(x, w_nk, scales, act):
    xq = quantize(x, act, axis=-1)
    acc = int8_dot(xq.codes, w_nk, 1)
    y = acc.astype(jnp.float32) * xq.scales.astype(jnp.float32) * scales.astype(jnp.float32).reshape(1, -1)
    return y.astype(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="14336x4096,4096x14336,8192x8192,4096x4096")
    p.add_argument("--m", default="1024,4096,8192")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    act = get_format("int8")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    key = jax.random.PRNGKey(0)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        wb = B.weight_sets(None, k, n, 2, key)
        wq = [quantize(w.astype(jnp.float32), "int8", axis=0) for w in wb]
        nk = [jnp.asarray(q.codes.T) for q in wq]
        for m in (int(v) for v in args.m.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            xq = quantize(x, act, axis=-1).codes
            jobs = {
                "bf16": (lambda x, w: jnp.dot(x, w), x, wb),
                "native": (lambda x, w: xla_native_dot.native_lowp_dot(x, w, act), x, wq),
                "int8-kn": (lambda xq, c: int8_dot(xq, c.codes, 0), xq, wq),
                "int8-nk": (lambda xq, c: int8_dot(xq, c, 1), xq, nk),
                "native-nk": (lambda x, c: native_nk(x, c[0], c[1], act), x, [(c, q.scales) for c, q in zip(nk, wq)]),
            }
            times = B.time_jobs(list(jobs.values()), args.reps, print)
            base = times[0].seconds
            for name, t in zip(jobs, times):
                top = sorted(t.kernels.items(), key=lambda kv: -kv[1])[:4]
                print(f"{shape} M={m:5d} {name:10s} {t.seconds * 1e6:9.1f} us  x{base / t.seconds:5.2f} vs bf16  "
                      f"{2 * m * n * k / t.seconds / 1e12:6.0f} TOP/s  "
                      + "; ".join(f"{kn} {v * 1e6:.0f}" for kn, v in top), flush=True)
                rows.append(dict(k=k, n=n, m=m, path=name, seconds=t.seconds, vs_bf16=base / t.seconds,
                                 kernels=t.kernels, xla_flags=os.environ.get("XLA_FLAGS", "")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
