"""`scope run RECIPE --out RUN_DIR`: the round loop (generate, score, correct, train, eval)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("run")(run)


@user_errors
def run(
    recipe: Annotated[str, typer.Argument(
        help="recipe YAML file, or a bundled recipe name (arith-tiny, qwen2.5-math-7b)")],
    out: Annotated[str, typer.Option(help="run folder (round-XXXX/<stage>/, metrics.parquet)")],
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the recipe's)")] = None,
    resume: Annotated[bool, typer.Option(
        help="continue a run: skip stages done with the same config")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="print the equivalent `scope <stage>` commands, run nothing")] = False,
    algo: Annotated[str | None, typer.Option(
        help="override the recipe's algo: grpo | luffy | prm_dense | scope")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
) -> None:
    """Run (or resume) every round of a recipe and write RUN_DIR/metrics.parquet."""
    from pipelines.run import RunConfig
    from pipelines.run import run as run_loop

    overrides = {k: v for k, v in (("algo", algo), ("seed", seed)) if v is not None}
    result = run_loop(RunConfig(recipe=recipe, out=out, rounds=rounds, resume=resume,
                                dry_run=dry_run, overrides=overrides))
    if dry_run:
        return
    from pipelines.console import print_summary

    last = result.metrics.filter(result.metrics["round"] == result.metrics["round"].max())
    rows = [("run folder", result.run_dir), ("stages run", len(result.ran)),
            ("stages skipped (done)", len(result.skipped))]
    for r in last.iter_rows(named=True):
        rows.append((f"{r['eval_set']} accuracy (round {r['round']})", r["accuracy"]))
    print_summary("scope run", rows)
