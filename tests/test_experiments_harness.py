"""experiments/harness.py: rows resume, atomic writes, markdown tables, report-only round trip (pure python)."""

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import harness  # noqa: E402
from harness import Column, Results  # noqa: E402

ROWS = [{"method": "rtn", "bits": 4, "ppl": 54.14229, "acc": 0.365},
        {"method": "gptq", "bits": 4, "ppl": 54.000533, "acc": None}]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--progress", action="store_true")
    harness.add_arguments(parser, model="tiny", seeds=[0])
    return parser


def _experiment(tmp_path: Path, extra: list[str], ran: list, reports: list) -> None:
    """Run a two-row experiment whose ``run`` records which rows it computed."""

    def run(args, results: Results) -> None:
        results.set_meta(windows=3)
        for row in ROWS:
            if not results.has(method=row["method"]):
                ran.append(row["method"])
                results.add({**row, "items": args.items})

    def report(runs: list[Results], base: Path) -> None:
        reports.append(runs)
        harness.write_text_atomic(base.with_name(base.name + ".md"), "\n".join(
            [*harness.table(runs[0].rows, [Column("method", "method"), Column("ppl", "ppl", ".2f")]), "",
             harness.reproduce(runs[0].command)]) + "\n")

    harness.run_experiment(_parser(), stem=lambda a: f"exp-{a.model}", key=("method",), run=run, report=report,
                           quick={"items": 8}, volatile=("progress",), argv=["experiments/exp.py", "--out", str(tmp_path), *extra])


def test_resume_keeps_rows_of_the_same_arguments(tmp_path):
    ran, reports = [], []
    _experiment(tmp_path, [], ran, reports)
    assert ran == ["rtn", "gptq"]
    data = json.loads((tmp_path / "exp-tiny.json").read_text())
    assert data["args"] == {"items": 200, "model": "tiny", "seeds": [0]} and data["key"] == ["method"]
    assert [r["method"] for r in data["rows"]] == ["rtn", "gptq"] and data["meta"] == {"windows": 3}
    ran.clear()
    _experiment(tmp_path, ["--resume"], ran, reports)
    assert ran == []  # both rows kept
    _experiment(tmp_path, ["--resume", "--progress"], ran, reports)
    assert ran == []  # a volatile argument is not part of the run's identity
    ran.clear()
    _experiment(tmp_path, [], ran, reports)
    assert ran == ["rtn", "gptq"]  # without --resume the run starts over
    with pytest.raises(SystemExit, match="items"):
        _experiment(tmp_path, ["--resume", "--items", "5"], ran, reports)


def test_resume_after_an_interrupted_run(tmp_path):
    path = tmp_path / "exp-tiny.json"
    first = Results(path=path, script="exp", command="python experiments/exp.py", args={"items": 200, "model": "tiny",
                    "seeds": [0]}, key=("method",))
    first.add({**ROWS[0], "items": 200})  # the run died after its first row
    ran = []
    _experiment(tmp_path, ["--resume"], ran, [])
    assert ran == ["gptq"]
    assert [r["method"] for r in json.loads(path.read_text())["rows"]] == ["rtn", "gptq"]


def test_every_row_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results = Results(path=path, script="s", command="c", args={}, key=("method", "bits"))
    results.add(ROWS[0])
    assert json.loads(path.read_text())["rows"] == [ROWS[0]]
    replaced = []
    real = os.replace
    monkeypatch.setattr(harness.os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))),
                                                                  real(src, dst)))
    results.add(ROWS[1])
    (src, dst), = replaced
    assert dst == path and src.parent == path.parent and not src.exists()
    assert json.loads(path.read_text())["rows"] == ROWS
    results.add({**ROWS[0], "ppl": 1.0})  # the same id replaces the row
    assert [r["ppl"] for r in json.loads(path.read_text())["rows"]] == [ROWS[1]["ppl"], 1.0]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(harness.os, "replace", fail)
    before = path.read_text()
    with pytest.raises(OSError):
        results.add({**ROWS[1], "ppl": 2.0})
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_markdown_table():
    columns = [Column("method", "method"), Column("bits", "bits"), Column("ppl", "ppl", ".2f"),
               Column("Δppl", lambda r: r["ppl"] - ROWS[0]["ppl"], "+.3f"), Column("acc", "acc", ".3f")]
    expected = ["| method | bits | ppl | Δppl | acc |", "|---|---|---|---|---|"]
    for r in ROWS:
        acc = "–" if r["acc"] is None else f"{r['acc']:.3f}"
        expected.append(f"| {r['method']} | {r['bits']} | {r['ppl']:.2f} | {r['ppl'] - ROWS[0]['ppl']:+.3f} | {acc} |")
    assert harness.table(ROWS, columns) == expected
    assert harness.bullets(["a", "b"]) == ["- a", "- b"]


def test_command_line_drops_harness_only_flags():
    argv = [str(harness.REPO / "experiments/exp.py"), "--model", "m", "--out", "/tmp/x", "--resume", "--items=3",
            "--out=/y", "--quick", "--note", "two words"]
    assert harness.command_line(argv) == "python experiments/exp.py --model m --items=3 --quick --note 'two words'"


def test_report_only_round_trip(tmp_path):
    ran, reports = [], []
    _experiment(tmp_path, ["--quick"], ran, reports)
    json_path, md_path = tmp_path / "exp-tiny-quick.json", tmp_path / "exp-tiny-quick.md"
    assert json.loads(json_path.read_text())["args"]["items"] == 8  # --quick's value
    expected_md = md_path.read_text()
    assert "Reproduce: `python experiments/exp.py --quick`." in expected_md
    md_path.unlink()
    ran.clear()
    _experiment(tmp_path, ["--quick", "--report-only"], ran, reports)
    assert ran == [] and md_path.read_text() == expected_md
    other = tmp_path / "other"
    _experiment(other, ["--report-only", str(json_path)], ran, reports)
    assert ran == [] and (other / "exp-tiny.md").read_text() == expected_md
    assert reports[-1][0].rows == [{**r, "items": 8} for r in ROWS]


def test_report_only_reads_an_older_layout_through_the_adapter(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(ROWS))
    seen = []

    def legacy(data, args):
        return {"script": "exp", "command": f"python experiments/exp.py --items {args.items}",
                "args": harness.run_args(args), "key": ["method"], "rows": data}

    harness.run_experiment(_parser(), stem=lambda a: "exp", key=("method",), run=None,
                           report=lambda runs, base: seen.extend(runs), legacy=legacy,
                           argv=["exp.py", "--report-only", str(old), "--items", "7", "--out", str(tmp_path)])
    assert seen[0].rows == ROWS and seen[0].command == "python experiments/exp.py --items 7"
    assert old.read_text() == json.dumps(ROWS)  # never rewritten


def test_plot_rows_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    fig, axes = harness.figure(1, 2)
    harness.plot_rows(axes[0, 0], ROWS, x="bits", y="ppl", series="method")
    harness.plot_rows(axes[0, 1], ROWS, x="method", y="ppl", kind="bar")
    harness.save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1
