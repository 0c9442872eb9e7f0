"""`scope score`: segment responses into steps, score them with a PRM, locate first errors."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors

PRM_HELP = "PRM: rule:arith | hf-cls:<model> | hf-tag:<model> | vllm:<model>"


def register(app: typer.Typer) -> None:
    app.command("score")(score)


def prm_options(
    step_token: str | None, good_token: str | None, bad_token: str | None,
    trust_remote_code: bool, max_length: int | None, batch_tokens: int | None,
    device: str | None, dtype: str | None, family: str | None,
    gpu_memory_utilization: float | None,
) -> dict[str, Any]:
    """The PRM engine options that were given (shared by score and prm-eval)."""
    given = {"step_token": step_token, "good_token": good_token, "bad_token": bad_token,
             "max_length": max_length, "batch_tokens": batch_tokens, "device": device,
             "dtype": dtype, "family": family, "gpu_memory_utilization": gpu_memory_utilization}
    opts: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if trust_remote_code:
        opts["trust_remote_code"] = True
    return opts


StepToken = Annotated[str | None, typer.Option(
    help="PRM step separator/tag (default: <extra_0> for hf-cls, ' ки' for hf-tag)")]
GoodToken = Annotated[str | None, typer.Option(help="hf-tag: token meaning 'correct' (+)")]
BadToken = Annotated[str | None, typer.Option(help="hf-tag: token meaning 'wrong' (-)")]
TrustRemote = Annotated[bool, typer.Option(
    "--trust-remote-code", help="allow the PRM's own model code (off by default)")]
MaxLength = Annotated[int | None, typer.Option(
    help="PRM context in tokens (default: the model's); longer inputs are truncated")]
BatchTokens = Annotated[int | None, typer.Option(
    help="hf PRMs: token budget per length-packed batch (default 8192)")]
Device = Annotated[str | None, typer.Option(help="hf PRMs: device (cpu, cuda)")]
Dtype = Annotated[str | None, typer.Option(help="PRM dtype: auto | float32 | bfloat16")]
Family = Annotated[str | None, typer.Option(help="vllm PRMs: cls (2-label head) | tag")]
GpuMem = Annotated[float | None, typer.Option(help="vllm: share of GPU memory (RAM on CPU)")]


@user_errors
def score(
    rollouts: Annotated[str, typer.Option(help="rollouts table folder (path or fsspec URL)")],
    out: Annotated[str, typer.Option(help="output scored table folder")],
    prm: Annotated[str, typer.Option(help=PRM_HELP)] = "rule:arith",
    threshold: Annotated[str, typer.Option(
        help="first error = first step with score below this; 'auto' tunes it for "
        "ProcessBench F1 (on --tune-on, or on arith rollouts' checker labels)")] = "0.5",
    only_failed: Annotated[bool, typer.Option(
        "--only-failed/--all", help="score only rollouts with a wrong final answer")] = True,
    tune_on: Annotated[str | None, typer.Option(
        help="ProcessBench-format file to tune --threshold auto on")] = None,
    step_mode: Annotated[str | None, typer.Option(
        help="newline | blank_line (default: newline for arith, blank_line otherwise)")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="policy tokenizer for token offsets (default: from the rollouts' policy column)")]
    = None,
    batch_size: Annotated[int, typer.Option(help="responses per PRM call")] = 256,
    num_shards: Annotated[int, typer.Option(help="split the stage into N parts")] = 1,
    shard_index: Annotated[int | None, typer.Option(
        help="run only this part (N machines split a stage)")] = None,
    step_token: StepToken = None, good_token: GoodToken = None, bad_token: BadToken = None,
    trust_remote_code: TrustRemote = False, max_length: MaxLength = None,
    batch_tokens: BatchTokens = None, device: Device = None, dtype: Dtype = None,
    family: Family = None, gpu_memory_utilization: GpuMem = None,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Score the steps of (failed) rollouts with a PRM and write the scored table."""
    from pipelines.stages.score import ScoreConfig, run

    result = run(ScoreConfig(
        rollouts=rollouts, out=out, prm=prm, threshold=threshold, only_failed=only_failed,
        step_mode=step_mode, tokenizer=tokenizer, tune_on=tune_on, batch_size=batch_size,
        prm_options=prm_options(step_token, good_token, bad_token, trust_remote_code,
                                max_length, batch_tokens, device, dtype, family,
                                gpu_memory_utilization),
        num_shards=num_shards, shard_index=shard_index, storage_options=storage_options(storage),
    ))
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
