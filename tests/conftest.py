"""Test-wide settings: offline hubs, a strict but practical JAX configuration."""

import gc
import os
from pathlib import Path

import jax
import pytest
from slow_tier import read_list

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Much of the suite's time is XLA compiling the same small programs again: in every test module (the caches
# are dropped between modules, below) and in each pytest-xdist worker. A persistent compilation cache on
# disk, shared by the workers, compiles each program once (measured on 2 cores, two workers: 29 minutes
# without it, 22.5 with it and one shared WKVQuant run). JQUANT_TEST_COMPILE_CACHE names another folder, or
# turns the cache off when set to "".
_COMPILE_CACHE = os.environ.get("JQUANT_TEST_COMPILE_CACHE",
                                str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compile-cache"))
if _COMPILE_CACHE:
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2**30)  # least recently used entries go first (a run writes ~50 MB)


@pytest.fixture
def x64():
    """JAX's 64-bit mode for one test (float64 exactness checks), restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


# Resident memory (GiB) of a test process above which its compiled programs are dropped after a module.
# JQUANT_TEST_RELEASE_GB="0" drops them after every module.
_RELEASE_GB = float(os.environ.get("JQUANT_TEST_RELEASE_GB", "3"))


def _resident_gb() -> float:
    """This process's resident memory in GiB (``VmRSS``; 0 where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled executables after a test module once the process holds more than
    ``_RELEASE_GB``: the suite compiles thousands of programs, and keeping them all for one process
    exhausted the 2-core CI machine's memory (an XLA segfault while compiling, late in the run), while
    dropping them after every module recompiles (or reloads) each module's shared programs again."""
    yield
    if _resident_gb() >= _RELEASE_GB:
        jax.clear_caches()
        gc.collect()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: listed in tests/slow_tests.txt (10 s or more in a cold run); deselected "
                                       "by the default options, run with -m slow (or -m '' for everything)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of ``slow_tests.txt`` slow, before ``-m`` selects; a test named by its node id on the command
    line (``pytest tests/x.py::test_y``) is not marked, so asking for one slow test runs it."""
    slow = set(read_list())
    named = {arg.split("::", 1)[1] for arg in config.args if "::" in arg}
    for item in items:
        test = item.nodeid.split("::", 1)[-1]
        if item.nodeid in slow and test not in named and test.split("[")[0] not in named:
            item.add_marker(pytest.mark.slow)
