"""Test-wide settings: offline hubs, a strict but practical JAX configuration."""

import gc
import os

import jax
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def x64():
    """JAX's 64-bit mode for one test (float64 exactness checks), restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled executables after each test module: the suite compiles thousands of
    programs, and keeping them all for one process exhausted the 2-core CI machine's memory (an XLA
    segfault while compiling, late in the run)."""
    yield
    jax.clear_caches()
    gc.collect()
