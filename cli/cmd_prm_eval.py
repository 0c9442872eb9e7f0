"""`scope prm-eval`: ProcessBench-protocol evaluation of a PRM's first-error location."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.stages.prm_eval import PRMEvalConfig


def register(app: typer.Typer) -> None:
    app.command("prm-eval")(prm_eval)


@user_errors
@config_command(PRMEvalConfig)
def prm_eval(
    cfg: PRMEvalConfig,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Accuracy on erroneous / correct samples and F1 per subset, and the average F1."""
    from pipelines.stages.prm_eval import print_result, run

    result = run(cfg)
    if as_json:
        typer.echo(json.dumps(_no_nan(result.as_dict()), indent=1))
        return
    print_result(result)


def _no_nan(value: object) -> object:
    """NaN (a subset without erroneous or correct samples) as JSON null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
