"""Every results file names the command that regenerates it (experiments/results_index.py)."""

import importlib.util
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _index_module():
    spec = importlib.util.spec_from_file_location("results_index", EXPERIMENTS / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_file_has_a_command_naming_an_existing_script():
    assert _index_module().check_index() == []


def test_the_checked_in_index_is_current():
    index = _index_module()
    assert (EXPERIMENTS / "results" / "README.md").read_text() == index.index_markdown(), \
        "experiments/results/README.md is stale: run python experiments/results_index.py"


def test_a_file_without_a_command_is_reported(tmp_path):
    index = _index_module()
    (tmp_path / "a.md").write_text("# A\n\nReproduce: `python experiments/missing_script.py --x`\n")
    (tmp_path / "b.md").write_text("# B\n\nno command here\n")
    problems = index.check_index(tmp_path)
    assert any("a.md" in p and "missing_script.py" in p for p in problems)
    assert any("b.md" in p and "no `python" in p for p in problems)
