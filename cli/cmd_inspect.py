"""`scope inspect PATH`: schema, row count, status counts and first rows of a table."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import storage_options, user_errors
from pipelines.config import STORAGE_OPTIONS_HELP


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


@user_errors
def inspect(
    path: Annotated[str, typer.Argument(help="table folder (local path or fsspec URL)")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="first rows to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Show a table's manifest, schema, row count, status counts and first rows."""
    from scope_data.inspect import describe

    info = describe(path, rows, storage_options(storage))
    if as_json:
        typer.echo(json.dumps(info, indent=1, default=str))
        return
    from rich.console import Console

    from pipelines.console import printable, summary_table

    out = Console()
    out.print(summary_table(f"{info['table']} table at {info['url']}", [
        ("rows", info["rows"]), ("parts", info["parts"]),
        ("schema_version", info["schema_version"]), ("config_hash", info["config_hash"]),
        ("created", info["created"]),
        *[(f"{col} counts", counts) for col, counts in info["status_counts"].items()],
    ]))
    out.print("[bold]schema[/]")
    for name, dtype in info["schema"].items():
        out.print(f"  {printable(name)}: {printable(dtype)}", highlight=False)
    out.print(f"[bold]first {len(info['head'])} rows[/]")
    for row in info["head"]:
        out.print("  " + printable(json.dumps(row, default=str)[:300]), highlight=False)
    out.print("[bold]read with[/]")
    for reader, line in info["read_with"].items():
        out.print(f"  {reader}: {line}", highlight=False, markup=False, soft_wrap=True)
