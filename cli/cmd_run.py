"""`scope run RECIPE --out RUN_DIR`: the round loop (generate, score, correct, train, eval)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Annotated, Any

import typer

from cli.common import user_errors
from cli.options import command_args, config_command
from pipelines.loop.round_loop import RunConfig

# stage kind -> the leading words of the command that runs it by hand
COMMANDS = {
    "problems": ["problems", "arith"], "generate": ["generate"], "score": ["score"],
    "correct": ["correct"], "train": ["train"], "eval": ["eval"],
}


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def render_command(kind: str, cfg: Any, launch: dict[str, str] | None = None) -> str:
    """The `scope <stage>` command for a stage config: options that differ from the defaults.

    Config fields the command has no flag for are listed in a trailing comment. `launch` maps a
    stage kind to a launcher prefix replacing `scope` (e.g. train: `accelerate launch ...`).
    """
    words, notes = command_args(cfg)
    line = " ".join(shlex.quote(w) for w in ["scope", *COMMANDS[kind], *words])
    launcher = (launch or {}).get(kind)
    if launcher:
        line = launcher + line[len("scope"):]
    return line + (f"  # no flag for: {', '.join(notes)}" if notes else "")


@user_errors
@config_command(RunConfig)
def run(
    cfg: RunConfig,
    algo: Annotated[str | None, typer.Option(
        help="override the recipe's algo: grpo | luffy | prm_dense | scope")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
) -> None:
    """Run (or resume) every round of a recipe and write RUN_DIR/metrics.parquet."""
    from pipelines.loop.round_loop import run as run_loop

    cfg.overrides = {k: v for k, v in (("algo", algo), ("seed", seed)) if v is not None}
    result = run_loop(cfg)
    if cfg.dry_run:
        if any("TINY_POLICY" in json.dumps(dataclasses.asdict(c), default=str)
               for _, c in result.plan):
            typer.echo("# first: scope tiny-policy --out TINY_POLICY")
        for kind, stage_cfg in result.plan:
            typer.echo(render_command(kind, stage_cfg, result.launch))
        return
    from pipelines.console import print_summary

    last = result.metrics.filter(result.metrics["round"] == result.metrics["round"].max())
    rows = [("run folder", result.run_dir), ("stages run", len(result.ran)),
            ("stages skipped (done)", len(result.skipped))]
    for r in last.iter_rows(named=True):
        rows.append((f"{r['eval_set']} accuracy (round {r['round']})", r["accuracy"]))
    print_summary("scope run", rows)
