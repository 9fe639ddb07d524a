"""JAX's persistent compilation cache, for runs that quantize or evaluate the same shapes again.

A first ``jq.quantize`` in a process compiles its programs (GPTQ's factor and sweep per input size, the calibration
and block forwards); with the cache, a later process finds them on disk instead: ``experiments/results/gptq_speed.md``
measures the first call of a fresh process with an empty and with a warm cache.
"""

from __future__ import annotations

from pathlib import Path

import jax

COMPILE_CACHE_MIN_SECONDS = 0.1
"""Programs that took at least this long to compile are kept (GPTQ's factor and sweep, the calibration and block
forwards); the many tiny ones (cutting columns into chunks, ...) compile faster than a cache entry is written."""


def use_compile_cache(folder: str | Path, *, min_seconds: float = COMPILE_CACHE_MIN_SECONDS) -> Path:
    """Keep XLA's compiled programs in ``folder`` (created if missing) and reuse them in later processes. Call it
    before anything compiles: JAX fixes the cache at its first use in a process. Returns the folder."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"compile cache {folder} is a file; give a folder (it is created if missing).")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}.")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))
    return folder
