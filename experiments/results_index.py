"""Index of every results file -> experiments/results/README.md.

    python experiments/results_index.py

One row per ``experiments/results/*.md``: its title (the first ``#`` heading), the first command in it that runs a
script of ``experiments/`` (the one that regenerates it), the script's name and its verdict line (``**Verdict:**``,
written by the script from the run's numbers: ``harness.verdict``); the index is rebuilt from the files, so it stays
true when a result is regenerated. ``check_index`` lists the files whose command is missing or names a script that
does not exist, or that have no verdict line (the test suite runs it).
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = re.compile(r"`(python[^`]*?experiments/(\w+)\.py[^`]*)`")
VERDICT = "**Verdict:**"  # harness.VERDICT (this script runs without the experiments' imports)


def entry(path: Path) -> dict:
    """``{"file", "title", "command", "script", "verdict"}`` of one results markdown file (command / script /
    verdict None if absent)."""
    text = path.read_text()
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
    found = COMMAND.search(text)
    verdict = next((line[len(VERDICT):].strip() for line in text.splitlines() if line.startswith(VERDICT)), None)
    return {"file": path.name, "title": title, "command": found.group(1) if found else None,
            "script": f"{found.group(2)}.py" if found else None, "verdict": verdict}


def check_index(results: Path = RESULTS) -> list[str]:
    """Problems: results files with no regenerating command, whose command names a missing script, or without a
    verdict line."""
    problems = []
    for e in map(entry, sorted(results.glob("*.md"))):
        if e["file"] == "README.md":
            continue
        if e["command"] is None:
            problems.append(f"{e['file']}: no `python experiments/<script>.py ...` command")
        elif not (results.parent / e["script"]).is_file():
            problems.append(f"{e['file']}: its command names experiments/{e['script']}, which does not exist")
        if e["verdict"] is None:
            problems.append(f"{e['file']}: no `{VERDICT}` line (harness.verdict, formatted from the run)")
    return problems


def index_markdown(results: Path = RESULTS) -> str:
    lines = ["# Results index", "",
             "Every results file of `experiments/results/`, the command that regenerates it and its verdict against "
             "the paper (or the stated target), built by `python experiments/results_index.py` from the files "
             "themselves; each verdict is formatted by its script from the run's numbers, and each file's reading "
             "gives the details.", "", "| results | what | regenerate | verdict |", "|---|---|---|---|"]
    for e in map(entry, sorted(results.glob("*.md"))):
        if e["file"] != "README.md":
            verdict = (e["verdict"] or "-").replace("|", "\\|")
            lines.append(f"| [{e['file']}]({e['file']}) | {e['title']} | `{e['command'] or '-'}` | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    problems = check_index()
    if problems:
        raise SystemExit("results files to fix:\n" + "\n".join(problems))
    out = RESULTS / "README.md"
    out.write_text(index_markdown())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
