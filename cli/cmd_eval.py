"""`scope eval`: accuracy, avg@n, pass@k, length and diversity of a model on a problems table."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.stages.evaluate import EvalConfig


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)


@user_errors
@config_command(EvalConfig)
def eval_(
    cfg: EvalConfig,
    as_json: Annotated[bool, typer.Option("--json", help="print metrics.json to stdout")] = False,
) -> None:
    """Sample n responses per problem and report accuracy, pass@k, length and diversity."""
    from pipelines.stages.evaluate import run

    result = run(cfg, quiet=as_json)
    if as_json:
        typer.echo(json.dumps(result.metrics, indent=1, default=str))
