"""`scope correct`: salvage failed rollouts with teacher-written suffixes (corrected table)."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.stages.correct import CorrectConfig


def register(app: typer.Typer) -> None:
    app.command("correct")(correct)


@user_errors
@config_command(CorrectConfig)
def correct(cfg: CorrectConfig) -> None:
    """Correct failed rollouts from their first error on; write every rollout + corrections."""
    from pipelines.stages.correct import run

    result = run(cfg)
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
