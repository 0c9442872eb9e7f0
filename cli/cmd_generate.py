"""`scope generate`: sample n responses per problem with the policy and write the rollouts table."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.stages.generate import GenerateConfig


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


@user_errors
@config_command(GenerateConfig)
def generate(cfg: GenerateConfig) -> None:
    """Sample n responses per problem, grade them and write the rollouts table (resumable)."""
    from pipelines.stages.generate import run

    result = run(cfg)
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
