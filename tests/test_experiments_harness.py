"""experiments/harness.py: rows resume, atomic writes, markdown tables, report-only round trip (pure python); the
GPU benchmark bench_kernels.py's merge and report-only paths (no GPU needed)."""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
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
                           quick={"items": 8}, volatile=("progress",),
                           argv=["experiments/exp.py", "--out", str(tmp_path), *extra])


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


def test_report_only_without_a_json_names_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match=r"no results JSON to read \(.*exp-tiny\.json\); run the experiment first"):
        _experiment(tmp_path, ["--report-only"], [], [])
    with pytest.raises(SystemExit, match=r"no results JSON to read \(.*gone\.json\)"):
        _experiment(tmp_path, ["--report-only", str(tmp_path / "gone.json")], [], [])
    assert not list(tmp_path.iterdir())  # nothing written


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


def test_add_rows_saves_once_and_replaces_rows_of_the_same_id(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results = Results(path=path, script="s", command="c", args={}, key=("method", "bits"))
    results.add(ROWS[0])
    replaced = []
    real = os.replace
    monkeypatch.setattr(harness.os, "replace", lambda src, dst: (replaced.append(dst), real(src, dst)))
    results.add_rows([ROWS[1], {**ROWS[0], "ppl": 3.0}])
    assert len(replaced) == 1
    assert json.loads(path.read_text())["rows"] == [ROWS[1], {**ROWS[0], "ppl": 3.0}]


def test_the_key_may_depend_on_the_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    harness.add_arguments(parser)

    def run(args, results: Results) -> None:
        results.add({"kernel": "k", "config": {"bm": 1}} if args.check else {"case": "c", "m": 1})

    for extra, key in (([], ["case", "m"]), (["--check"], ["kernel", "config"])):
        harness.run_experiment(parser, stem=lambda a: "check" if a.check else "sweep",
                               key=lambda a: ("kernel", "config") if a.check else ("case", "m"), run=run,
                               report=lambda runs, base: None, argv=["x.py", "--out", str(tmp_path), *extra])
        assert json.loads((tmp_path / f"{'check' if extra else 'sweep'}.json").read_text())["key"] == key


def _sweep(rng, device: str, shape: tuple[int, int]) -> dict:
    """A random sweep in ``jquant.benchmark.run_benchmark``'s layout (the older bench_kernels JSON)."""
    k, n = shape
    rows, tuned = [], {}
    for m in (1, 4):
        base = float(rng.uniform(1e-5, 1e-4))
        for case, path in (("bf16", "bf16"), ("w4", "xla"), ("w4", "pallas")):
            seconds = base if path == "bf16" else float(rng.uniform(1e-5, 1e-4))
            config = {"block_m": int(rng.choice([1, 16])), "block_n": 64} if path == "pallas" else None
            rows.append({"case": case, "path": path, "k": k, "n": n, "m": m, "seconds": seconds,
                         "roofline_fraction": float(rng.uniform()), "tb_per_s": float(rng.uniform()),
                         "tflop_per_s": float(rng.uniform()), "vs_bf16": base / seconds, "config": config,
                         "kernel": "pallas-w" if config else None, "span_seconds": seconds, "kernels": {},
                         "method": "device"})
            if config:
                tuned[f"w4|{k}x{n}|{m}"] = {"kernel": "pallas-w", "config": config}
    return {"device": device, "jax": "0.11.2", "ceilings": {"hbm_bytes_per_s": float(rng.uniform(1e12, 3e12)),
                                                           "bf16_flops_per_s": float(rng.uniform(1e14, 9e14))},
            "rows": rows, "tuned": tuned}


def test_bench_kernels_merges_and_reports_older_sweeps(tmp_path, monkeypatch):
    """bench_kernels --merge / --report-only (no GPU): the older sweep layout read, rows and tuned choices
    combined as before, the markdown and dispatch table those of jquant.benchmark_report."""
    import bench_kernels
    from jquant import benchmark_report
    from jquant.pallas_kernels import registry

    rng = np.random.default_rng()
    parts = [_sweep(rng, "Some GPU 80GB", (256, 512)), _sweep(rng, "Some GPU 80GB", (512, 256))]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for part, path in zip(parts, paths):
        path.write_text(json.dumps(part))
    merged = {**parts[0], "rows": parts[0]["rows"] + parts[1]["rows"], "tuned": {**parts[0]["tuned"],
                                                                              **parts[1]["tuned"]}}
    monkeypatch.setattr(registry, "TABLE_PATH", str(tmp_path / "table.json"))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["experiments/bench_kernels.py", "--merge", *map(str, paths), "--out", str(out),
                                      "--write-table"])
    bench_kernels.main()
    data = json.loads((out / "kernels_some_gpu_80gb.json").read_text())
    assert data["rows"] == merged["rows"] and data["meta"]["tuned"] == merged["tuned"]
    assert data["meta"]["ceilings"] == parts[0]["ceilings"]
    assert json.loads((tmp_path / "table.json").read_text()) == benchmark_report.dispatch_table(merged)
    expected = benchmark_report.markdown_report(merged)
    assert (out / "kernels_some_gpu_80gb.md").read_text() == expected + f"\n{harness.reproduce(data['command'])}\n"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--report-only", str(paths[0]), "--out", str(out)])
    bench_kernels.main()  # the older layout, named after its JSON; no command recorded, so no Reproduce line
    assert (out / "a.md").read_text() == benchmark_report.markdown_report(parts[0])
    (out / "kernels_some_gpu_80gb.md").unlink()
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--report-only", "--out", str(out)])
    bench_kernels.main()  # every kernels_*.json in --out
    assert (out / "kernels_some_gpu_80gb.md").read_text().startswith(expected)
    assert paths[0].read_text() == json.dumps(parts[0])  # never rewritten
