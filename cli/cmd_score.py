"""`scope score`: segment responses into steps, score them with a PRM, locate first errors."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.stages.score import ScoreConfig


def register(app: typer.Typer) -> None:
    app.command("score")(score)


@user_errors
@config_command(ScoreConfig)
def score(cfg: ScoreConfig) -> None:
    """Score the steps of (failed) rollouts with a PRM and write the scored table."""
    from pipelines.stages.score import run

    result = run(cfg)
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
