"""A small progress-bar wrapper over rich, so long loops report progress the same way everywhere.

On a terminal it draws a live bar; when output goes to a file (background
jobs, CI logs) it prints a plain line at every tenth of the work instead.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task, *, total: int, initial: int, description: str, log: bool):
        self._progress, self._task = progress, task
        self._total, self._done, self._description, self._log = total, initial, description, log
        self._next_log = initial + max(1, total // 10)
        self._t0 = time.perf_counter()

    def update(self, advance: int = 1, **metrics) -> None:
        self._done += advance
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None)
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, metrics=shown)
        elif self._log and (self._done >= self._next_log or self._done == self._total):
            self._next_log += max(1, self._total // 10)
            elapsed = time.perf_counter() - self._t0
            print(f"{self._description}: {self._done}/{self._total} ({elapsed:.0f}s) {shown}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(*, total: int, description: str, initial: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    """Context manager yielding a bar with ``update(advance, **metrics)``; silent when ``enabled`` is False."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield _Bar(None, None, total=total, initial=initial, description=description, log=enabled)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=initial, metrics="")
        yield _Bar(progress, task, total=total, initial=initial, description=description, log=False)
