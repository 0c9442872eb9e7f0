"""`scope demo`: SCOPE vs grpo, luffy and prm_dense on the embedded arith task (CPU)."""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.loop.demo import DemoConfig


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@user_errors
@config_command(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """Build/reuse the tiny policy, run every algorithm on the same budget, print the table."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SCOPE_NUM_THREADS", "1"))
    from pipelines.loop.demo import run

    run(cfg)
