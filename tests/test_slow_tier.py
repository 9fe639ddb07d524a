"""The slow tier's list names tests that exist, and its writer keeps exactly the tests at or above the threshold."""

import ast
from pathlib import Path

import numpy as np
import pytest
import slow_tier

ROOT = Path(__file__).resolve().parents[1]


def _defined_tests(path: Path) -> set[str]:
    """``name`` and ``Class::name`` of every test function defined in ``path``."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef))
            if node.bases:  # a family test class inherits its tests from a shared suite
                names.add(f"{node.name}::*")
    return names


def test_every_listed_test_exists():
    listed = slow_tier.read_list()
    assert listed, "tests/slow_tests.txt is empty"
    missing = []
    for node in listed:
        file, _, test = node.partition("::")
        path = ROOT / file
        if not path.is_file():
            missing.append(node)
            continue
        name = test.split("[", 1)[0]
        defined = _defined_tests(path)
        owner = name.split("::")[0] if "::" in name else None
        if name not in defined and not (owner and f"{owner}::*" in defined):
            missing.append(node)
    assert not missing, f"tests/slow_tests.txt names tests that are gone (rewrite it, see tests/slow_tier.py): {missing}"


def test_writer_keeps_the_tests_at_or_above_the_threshold(tmp_path):
    rng = np.random.default_rng()
    seconds = {f"tests/test_x.py::test_{i}": float(s) for i, s in enumerate(rng.uniform(1, 30, 12).round(2))}
    seconds["tests/test_x.py::test_0"] = 10.0
    lines = [f"{s:.2f}s call     {node}" for node, s in seconds.items()]
    lines += ["4.00s setup    tests/test_x.py::test_1", "0.50s teardown tests/test_x.py::test_2"]
    seconds["tests/test_x.py::test_1"] += 4.0
    seconds["tests/test_x.py::test_2"] += 0.5
    log = tmp_path / "suite.log"
    log.write_text("===== slowest durations =====\n" + "\n".join(lines) + "\n1 passed\n")
    # a second run (the default tier): a test it saw slower counts with that time, a new test joins
    later = {"tests/test_x.py::test_3": seconds["tests/test_x.py::test_3"] + 20.0, "tests/test_y.py::test_new": 11.0,
             "tests/test_y.py::test_fast": 2.0}
    second = tmp_path / "fast.log"
    second.write_text("".join(f"{s:.2f}s call     {node}\n" for node, s in later.items()))
    seconds.update(later)
    out = tmp_path / "slow.txt"
    slow_tier.main([str(log), str(second), "--threshold", "10", "--out", str(out)])
    assert slow_tier.read_list(out) == sorted(n for n, s in seconds.items() if round(s, 2) >= 10)


def test_writer_refuses_a_log_whose_list_stops_above_the_threshold(tmp_path):
    log = tmp_path / "suite.log"
    log.write_text("30.00s call     tests/test_x.py::test_a\n12.00s call     tests/test_x.py::test_b\n")
    out = tmp_path / "slow.txt"
    with pytest.raises(SystemExit, match="stops at 12.0 s"):
        slow_tier.main([str(log), "--threshold", "10", "--out", str(out)])
    assert not out.exists()
