"""Progress bars and one-screen summaries shared by every stage."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


@dataclass
class _LineTask:
    id: int
    description: str
    total: float | None
    completed: float = 0.0
    start: float = field(default_factory=lambda: time.monotonic())
    last: float = field(default_factory=lambda: time.monotonic())
    shown: float | None = None  # `completed` when last printed (None: never)


class LineProgress:
    """Progress for a stderr that is not a terminal (CI logs, `| tee`, nohup): a plain line per
    task every `every` seconds ($SCOPE_PROGRESS_EVERY, default 30) and a last one when a task
    that printed finishes. Work shorter than `every` prints nothing. Same calls as rich's
    Progress (the subset the stages use)."""

    def __init__(self, every: float | None = None) -> None:
        self.every = float(os.environ.get("SCOPE_PROGRESS_EVERY", 30)) if every is None else every
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for task in self.tasks:
            if task.shown is not None and task.shown != task.completed:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self.tasks.append(_LineTask(len(self.tasks), description, total))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None,
               advance: float | None = None, description: str | None = None,
               total: float | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        now = time.monotonic()
        if now - task.last >= self.every:
            task.last = now
            self._print(task)

    @staticmethod
    def _print(task: _LineTask) -> None:
        done, total = task.completed, task.total
        task.shown = done
        share = f" ({100 * done / total:.0f}%)" if total else ""
        of = f"/{total:g}" if total else ""
        print(f"{task.description}: {done:g}{of}{share}, {time.monotonic() - task.start:.0f} s",
              file=sys.stderr, flush=True)


def progress() -> Progress | LineProgress:
    """A rich progress bar on stderr, or plain progress lines when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return LineProgress()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def part_task(bar: Progress, description: str, total: int) -> TaskID:
    """The task `description` of `bar`, its total grown by `total`: a stage's `process` runs
    once per batch of a part, and the part keeps one bar."""
    for task in bar.tasks:
        if task.description == description:
            bar.update(task.id, total=(task.total or 0) + total)
            return task.id
    return bar.add_task(description, total=total)


def printable(value: Any) -> str:
    """`value` as text safe for a terminal: control characters (escape sequences, bells) shown
    as ``\\x1b``-style escapes and rich markup (``[link=...]``) escaped, so data from a table,
    a file or a server can never drive the terminal."""
    text = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in str(value))
    return escape(text)


def summary_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column table; every cell (and the title) goes through `printable`."""
    table = Table(title=printable(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(printable(key), printable(_fmt(value)))
    return table


_SUMMARIES = contextvars.ContextVar("scope_summaries", default=True)


@contextlib.contextmanager
def summaries_off() -> Iterator[None]:
    """`print_summary` prints nothing inside (a caller that discards stdout anyway: rendering a
    table costs ~5 ms per stage, and an online worker runs five stages per round)."""
    token = _SUMMARIES.set(False)
    try:
        yield
    finally:
        _SUMMARIES.reset(token)


def print_summary(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a two-column summary table to stdout (unless inside `summaries_off()`)."""
    if _SUMMARIES.get():
        Console().print(summary_table(title, rows))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)
