"""`scope worker ROLE --run RUN_DIR`: one online worker (see `pipelines.loop.online`)."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.loop.online import WorkerConfig


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


@user_errors
@config_command(WorkerConfig)
def worker(cfg: WorkerConfig) -> None:
    """Run one role's stages (generate, score, correct, train, eval) of an online run, round
    after round, waiting for their inputs; engines stay loaded. Generate, score and correct may
    run as N workers (same --run, --worker-index 0..N-1 --num-workers N) that split each stage
    by shard (the stage's num_shards >= N)."""
    from pipelines.console import print_summary
    from pipelines.loop.online import run_worker

    result = run_worker(cfg)
    print_summary(f"scope worker {cfg.role}", [
        ("run folder", result.run_dir), ("stages run", len(result.ran)),
        ("stages skipped (done)", len(result.skipped))])
