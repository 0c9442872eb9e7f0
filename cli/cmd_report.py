"""`scope report RUN_DIR...`: plots and a markdown summary of one or more runs."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("report")(report)


@user_errors
def report(
    run_dirs: Annotated[list[str], typer.Argument(help="run folders written by `scope run`")],
    out: Annotated[str | None, typer.Option(help="output folder (default RUN_DIR/report)")]
    = None,
    label: Annotated[str, typer.Option(
        help="metrics column that names a configuration; runs sharing it are seeds")] = "algo",
) -> None:
    """Plot accuracy, pass@k, diversity, salvage rate, first errors and loss; write report.md."""
    from pipelines.loop.report import report as make_report

    result = make_report(run_dirs, out, label=label)
    typer.echo(result.markdown)
    typer.echo(f"report: {result.out}/report.md ({len(result.plots)} plots)")
