"""`scope train`: train the policy on the corrected table with the mixed on/off-policy loss.

Multi-process: `accelerate launch [--config_file zero3.yaml] -m cli.main train ...`.
"""

from __future__ import annotations

import typer

from cli.common import user_errors
from cli.options import config_command
from pipelines.training.train import TrainConfig


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@user_errors
@config_command(TrainConfig)
def train(cfg: TrainConfig) -> None:
    """Assemble groups from the corrected table and train the policy (saves an HF model)."""
    from pipelines.training.train import run

    run(cfg)
