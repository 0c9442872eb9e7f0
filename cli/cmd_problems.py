"""`scope problems SRC --out DIR`: ingest a problem set (or generate arith / countdown problems)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import storage_options, user_errors
from pipelines.config import STORAGE_OPTIONS_HELP


def parse_steps(text: str) -> tuple[int, int]:
    """'3-6' -> (3, 6); '4' -> (4, 4)."""
    lo, _, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"--steps must look like 3-6 or 4, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--steps must satisfy 1 <= min <= max, got {text!r}")
    return bounds


def register(app: typer.Typer) -> None:
    app.command("problems")(problems)


@user_errors
def problems(
    src: Annotated[str, typer.Argument(
        help="JSONL/JSON/Parquet file (local or fsspec URL), a `datasets.save_to_disk` folder, "
        "a Hugging Face dataset name (offline when cached), or `arith` / `countdown` to generate "
        "problems")],
    out: Annotated[str, typer.Option("--out", "-o", help="output table folder (path or URL)")],
    problem_field: Annotated[str | None, typer.Option(
        help="field holding the problem text (default: auto-detect)")] = None,
    answer_field: Annotated[str | None, typer.Option(
        help="field holding the answer (default: auto-detect; '#### N' lines are split)")] = None,
    solution_field: Annotated[str | None, typer.Option(
        help="field holding a reference solution (default: `solution` when present; a list "
        "keeps its first item)")] = None,
    split: Annotated[str, typer.Option(help="dataset split (Hugging Face datasets)")] = "test",
    subset: Annotated[str | None, typer.Option(
        help="dataset configuration name (Hugging Face datasets, e.g. `main` for gsm8k)")] = None,
    source: Annotated[str | None, typer.Option(
        help="`source` column value (default: file stem or dataset name)")] = None,
    index_field: Annotated[str | None, typer.Option(
        help="field giving source_index (default: the record's position)")] = None,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="skip records without problem text or answer (counted)")] = False,
    limit: Annotated[int | None, typer.Option(help="write at most this many problems")] = None,
    count: Annotated[int, typer.Option(help="arith, countdown: number of problems")] = 1000,
    seed: Annotated[int, typer.Option(help="arith, countdown: generator seed")] = 0,
    steps: Annotated[str, typer.Option(help="arith: operations per problem, e.g. 3-6")] = "3-6",
    modulus: Annotated[int, typer.Option(help="arith, countdown: modulus")] = 10,
    numbers: Annotated[int, typer.Option(help="countdown: numbers per problem")] = 4,
    min_solutions: Annotated[int, typer.Option(
        help="countdown: fewest solution paths a problem may have (difficulty)")] = 1,
    max_solutions: Annotated[int | None, typer.Option(
        help="countdown: most solution paths a problem may have (default: no bound)")] = None,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Write a problems table from a data set file, a dataset name, or generated arith /
    countdown problems."""
    from pipelines.console import print_summary
    from scope_data import problems as pr

    options = storage_options(storage)
    if src == "arith":
        result = pr.write_arith(out, count=count, seed=seed, steps=parse_steps(steps),
                                modulus=modulus, storage_options=options)
        print_summary("problems (arith)", [
            ("rows", result.rows), ("source", result.source), ("steps", steps),
            ("modulus", modulus), ("output", result.output),
        ])
        return
    if src == "countdown":
        result = pr.write_countdown(out, count=count, seed=seed, numbers=numbers,
                                    modulus=modulus, min_solutions=min_solutions,
                                    max_solutions=max_solutions, storage_options=options)
        print_summary("problems (countdown)", [
            ("rows", result.rows), ("source", result.source), ("numbers", numbers),
            ("modulus", modulus), ("solutions per problem",
                                   f"{min_solutions}..{max_solutions or ''}"),
            ("output", result.output),
        ])
        return
    result = pr.ingest(src, out, problem_field=problem_field, answer_field=answer_field,
                       solution_field=solution_field,
                       split=split, subset=subset, source=source, index_field=index_field,
                       skip_invalid=skip_invalid, limit=limit, storage_options=options)
    fields = result.fields
    assert fields is not None
    answer = {"field": f"field {fields.answer!r}",
              "gsm8k": f"'#### N' line of field {fields.answer!r}",
              "boxed": f"last \\boxed{{}} of field {fields.solution!r}"}[fields.answer_from]
    print_summary(f"problems from {src}", [
        ("rows", result.rows), ("source", result.source), ("format", result.format),
        ("problem", f"field {fields.problem!r}"), ("answer", answer),
        ("skipped (invalid)", result.skipped), ("output", result.output),
    ])
    if result.skipped_examples:
        typer.echo("first skipped rows:", err=True)
        for message in result.skipped_examples:
            typer.echo(f"  {message}", err=True)
