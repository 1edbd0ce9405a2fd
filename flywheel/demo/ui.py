"""The demo's terminal UI: one live line per stage, or plain log lines without a terminal."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column


class StageBoard:
    """One live line per stage (spinner, progress, what it is doing, elapsed); records stage seconds.

    Without a terminal (CI, `make demo > log`) Rich draws nothing live, so stages are logged as plain lines
    instead: start, what it is doing (at most every ``plain_every_s``), end with its duration.
    """

    plain_every_s = 15.0

    def __init__(self, console: Console):
        self.console = console
        self.plain = not console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=38)),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=console,
        )
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None):
        n = sum(1 for k in self.seconds if k == name or k.startswith(f"{name} #"))
        name = f"{name} #{n + 1}" if n else name  # a repeated stage keeps its own time
        task = self.progress.add_task(name, total=total, info="")
        started = time.monotonic()
        handle = _StageHandle(
            self.progress, task, name, self.console if self.plain else None, self.plain_every_s
        )
        if self.plain:
            self.console.print(f"▶ {name}", highlight=False)
        try:
            yield handle
        except BaseException:
            self.progress.update(task, description=f"[red]✗ {name}")
            self.progress.stop_task(task)
            self.seconds[name] = time.monotonic() - started
            if self.plain:
                self.console.print(f"✗ {name} after {self.seconds[name]:.0f}s", highlight=False)
            raise
        self.seconds[name] = time.monotonic() - started
        if self.plain:
            self.console.print(f"✓ {name} in {self.seconds[name]:.0f}s", highlight=False)
        done = total if total is not None else 1
        self.progress.update(task, description=f"[green]✓ {name}", total=done, completed=done)
        self.progress.stop_task(task)


class _StageHandle:
    """What a stage reports; with ``plain_console`` set, changed info is also printed (throttled)."""

    def __init__(self, progress: Progress, task, name: str, plain_console: Console | None, every_s: float):
        self.progress, self.task, self.name = progress, task, name
        self.plain_console, self.every_s = plain_console, every_s
        self._printed, self._printed_at = "", float("-inf")

    def info(self, text: str) -> None:
        self.progress.update(self.task, info=text)
        now = time.monotonic()
        if (
            self.plain_console is not None
            and text != self._printed
            and now - self._printed_at >= self.every_s
        ):
            self.plain_console.print(f"  {self.name}: {text}", highlight=False, markup=False)
            self._printed, self._printed_at = text, now

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def task_line(states: dict[str, str | None], order: list[str]) -> str:
    """``window ✓  train ▶  evaluate ·`` for the live stage line."""
    marks = {"success": "✓", "running": "▶", "failed": "✗", "skipped": "–", "upstream_failed": "✗"}
    return "  ".join(f"{t} {marks.get(states.get(t) or '', '·')}" for t in order if t in states)
