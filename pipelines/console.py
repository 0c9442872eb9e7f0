"""Progress bars and one-screen summaries shared by every stage."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
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


def progress() -> Progress:
    """A rich progress bar on stderr (disabled when stderr is not a terminal and CI is quiet)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        disable=not sys.stderr.isatty(),
    )


def part_task(bar: Progress, description: str, total: int) -> TaskID:
    """The task `description` of `bar`, its total grown by `total`: a stage's `process` runs
    once per batch of a part, and the part keeps one bar."""
    for task in bar.tasks:
        if task.description == description:
            bar.update(task.id, total=(task.total or 0) + total)
            return task.id
    return bar.add_task(description, total=total)


def summary_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, _fmt(value))
    return table


def print_summary(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a two-column summary table to stdout."""
    Console().print(summary_table(title, rows))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)
