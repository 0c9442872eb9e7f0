"""`scope eval`: accuracy, avg@n, pass@k, length and diversity of a model on a problems table."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)


@user_errors
def eval_(
    model: Annotated[str, typer.Option(
        help="policy engine: hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
        "openai:<base_url>#<model>")],
    problems: Annotated[str, typer.Option(help="problems table folder (path or fsspec URL)")],
    out: Annotated[str, typer.Option(help="output folder (rollouts/, metrics.json, *.parquet)")],
    n: Annotated[int, typer.Option(help="samples per problem (pass@k for k = 1..n)")] = 4,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 0.6,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="response token budget")] = 256,
    seed: Annotated[int, typer.Option(help="base sampling seed")] = 0,
    limit: Annotated[int | None, typer.Option(help="only the first K problems")] = None,
    template: Annotated[str, typer.Option(help="chat | raw")] = "chat",
    round_: Annotated[int, typer.Option("--round", help="round index stored in the rows")] = 0,
    diversity_tokens: Annotated[str, typer.Option(
        help="tokens for distinct-n and self-BLEU: word | char")] = "word",
    dtype: Annotated[str | None, typer.Option(help="model dtype")] = None,
    device: Annotated[str | None, typer.Option(help="hf engine device (cpu, cuda)")] = None,
    batch_size: Annotated[int, typer.Option(help="hf engine batch size")] = 64,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vllm: share of GPU memory to use")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length cap")] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm tensor parallelism")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print metrics.json to stdout")] = False,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Sample n responses per problem and report accuracy, pass@k, length and diversity."""
    from pipelines.stages.evaluate import EvalConfig, run

    result = run(EvalConfig(
        model=model, problems=problems, out=out, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, limit=limit, template=template, round=round_,
        diversity_tokens=diversity_tokens, dtype=dtype, device=device, batch_size=batch_size,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size, storage_options=storage_options(storage),
    ), quiet=as_json)
    if as_json:
        typer.echo(json.dumps(result.metrics, indent=1, default=str))
