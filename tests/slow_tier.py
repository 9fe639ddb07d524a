"""The slow tier: tests whose cold run took at least a threshold on the 2-core reference machine.

The default test command (the README's, run by CI) deselects them; ``python -m pytest -q -n 2 -m slow`` runs them,
``-m ""`` runs everything. The list lives in ``slow_tests.txt`` beside this file and is rewritten from the
``--durations`` output of full cold runs::

    JQUANT_TEST_COMPILE_CACHE=/tmp/empty python -m pytest -q -n 2 -m "" --durations=400 > suite.log
    python tests/slow_tier.py suite.log --threshold 10

A test's seconds are its setup, call and teardown added up (a slow module fixture counts against the test that
first needed it in that run, so deselecting that test moves the fixture to the next one: pass the log of the
default tier's run as well, and the list keeps every test that was slow in either; a test in several logs counts
with its largest time).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

LIST_PATH = Path(__file__).with_name("slow_tests.txt")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s (?:call|setup|teardown)\s+(\S+)$")


def read_durations(log: str) -> Counter[str]:
    """Seconds per test node id from pytest's ``--durations`` lines in ``log``."""
    seconds: Counter[str] = Counter()
    for line in log.splitlines():
        match = _DURATION.match(line.strip())
        if match:
            seconds[match.group(2)] += float(match.group(1))
    return seconds


def read_list(path: Path = LIST_PATH) -> list[str]:
    """The node ids in the slow list (comments and blank lines skipped)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, nargs="+", help="pytest logs with the --durations output of full cold runs")
    parser.add_argument("--threshold", type=float, default=10.0, help="seconds at or above which a test is slow")
    parser.add_argument("--out", type=Path, default=LIST_PATH, help="the list to write (default: %(default)s)")
    args = parser.parse_args(argv)
    seconds: dict[str, float] = {}
    for log in args.logs:
        found = read_durations(log.read_text())
        if not found:
            sys.exit(f"{log}: no --durations lines found; run pytest with --durations=400 (see this file's docstring)")
        if min(found.values()) > args.threshold:
            sys.exit(f"{log}: its --durations list stops at {min(found.values()):.1f} s, above --threshold "
                     f"{args.threshold:g}; rerun with a longer --durations list")
        for node, s in found.items():
            seconds[node] = max(s, seconds.get(node, 0.0))
    slow = sorted(node for node, s in seconds.items() if s >= args.threshold)
    names = " ".join(log.name for log in args.logs)
    header = (f"# Tests deselected by default: {args.threshold:g} s or more in a cold run "
              f"(written by `python tests/slow_tier.py {names} --threshold {args.threshold:g}`).\n"
              f"# {len(slow)} tests, {sum(seconds[n] for n in slow):.0f} s of the {sum(seconds.values()):.0f} s "
              "the logs list. Run them with `python -m pytest -q -n 2 -m slow`.\n")
    args.out.write_text(header + "".join(node + "\n" for node in slow))
    print(f"{args.out}: {len(slow)} tests")


if __name__ == "__main__":
    main()
