"""Every results file names the command that regenerates it and carries a verdict line (experiments/results_index.py)."""

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


def test_a_file_without_a_verdict_is_reported_and_a_verdict_is_indexed(tmp_path):
    index = _index_module()
    command = "Reproduce: `python experiments/ecar.py --seeds 8`."
    (tmp_path / "c.md").write_text(f"# C\n\n{command}\n\n**Verdict:** not reproduced: 0.43 vs 0.85 | x.\n")
    (tmp_path / "d.md").write_text(f"# D\n\n{command}\n")
    problems = index.check_index(tmp_path)
    assert any("d.md" in p and "Verdict" in p for p in problems)
    assert not any("c.md" in p and "Verdict" in p for p in problems)
    assert "| not reproduced: 0.43 vs 0.85 \\| x. |" in index.index_markdown(tmp_path)
