"""`scope study`: algorithms x seeds x PRM settings on countdown and arith, with paired CIs."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.loop.study import StudyConfig


def register(app: typer.Typer) -> None:
    app.command("study")(study)


@user_errors
@config_command(StudyConfig)
def study(cfg: StudyConfig) -> None:
    """Run the comparison study (same budgets), then write study.md, CSVs and plots."""
    from pipelines.loop.study import run

    run(cfg)
