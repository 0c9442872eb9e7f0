"""`scope prm-eval`: ProcessBench-protocol evaluation of a PRM's first-error location."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from cli.cmd_score import (
    PRM_HELP,
    BadToken,
    BatchTokens,
    Device,
    Dtype,
    Family,
    GoodToken,
    GpuMem,
    MaxLength,
    StepToken,
    TrustRemote,
    prm_options,
)
from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors


def register(app: typer.Typer) -> None:
    app.command("prm-eval")(prm_eval)


@user_errors
def prm_eval(
    benchmark: Annotated[list[str], typer.Option(
        help="ProcessBench-format JSON file, or a table of arith rollouts (gold = the exact "
        "checker); repeat for several subsets")],
    prm: Annotated[str | None, typer.Option(
        help=PRM_HELP + " (omit to use the scores stored in a scored table)")] = None,
    threshold: Annotated[str, typer.Option(
        help="number, or 'auto': tuned for F1 on the first benchmark, applied to all")] = "0.5",
    limit: Annotated[int | None, typer.Option(help="only the first N items per benchmark")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    step_token: StepToken = None, good_token: GoodToken = None, bad_token: BadToken = None,
    trust_remote_code: TrustRemote = False, max_length: MaxLength = None,
    batch_tokens: BatchTokens = None, device: Device = None, dtype: Dtype = None,
    family: Family = None, gpu_memory_utilization: GpuMem = None,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Accuracy on erroneous / correct samples and F1 per subset, and the average F1."""
    from pipelines.stages.prm_eval import PRMEvalConfig, print_result, run

    result = run(PRMEvalConfig(
        benchmarks=benchmark, prm=prm, threshold=threshold, limit=limit,
        prm_options=prm_options(step_token, good_token, bad_token, trust_remote_code,
                                max_length, batch_tokens, device, dtype, family,
                                gpu_memory_utilization),
        storage_options=storage_options(storage),
    ))
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
