"""`scope demo`: SCOPE vs grpo, luffy and prm_dense on the embedded arith task (CPU)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@user_errors
def demo(
    quick: Annotated[bool, typer.Option(help="one seed, 2 rounds (about 2 minutes)")] = False,
    out: Annotated[str, typer.Option(help="output folder (runs/, report.md, plots)")]
    = "scope-demo",
    seeds: Annotated[int, typer.Option(help="seeds per algorithm (ignored with --quick)")] = 3,
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the recipe's)")] = None,
    algos: Annotated[str, typer.Option(help="comma-separated algorithms to compare")]
    = "grpo,luffy,prm_dense,scope",
    recipe: Annotated[str, typer.Option(help="recipe file or bundled name")] = "arith-tiny",
    verbose: Annotated[bool, typer.Option(help="print every stage's summary")] = False,
) -> None:
    """Build/reuse the tiny policy, run every algorithm on the same budget, print the table."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SCOPE_NUM_THREADS", "1"))
    from pipelines.loop.demo import DemoConfig, run

    run(DemoConfig(out=out, quick=quick, seeds=seeds, rounds=rounds,
                   algos=tuple(a.strip() for a in algos.split(",") if a.strip()),
                   recipe=recipe, verbose=verbose))
