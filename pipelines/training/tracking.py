"""Experiment tracking: `report_to` (transformers/TRL names), one tracker run per folder.

The Trainer's own integrations log every optimizer step (loss, grad norm, learning rate and the
objective's figures `MixedPolicyTrainer.log` adds: clip fraction, off-policy share, ...).
`Tracker` adds scope's own figures (per-round metrics, histograms) to the same tracker run.

One tracker run per logging folder, across rounds and processes:

    LOGGING_DIR/tracking.json   the wandb run id (every round's trainer and the round logger
                                resume it) and the keys already logged (a resumed `scope run`
                                does not log a round twice)
    LOGGING_DIR/tensorboard/    tensorboard event files (trainer steps and scope's figures)
    LOGGING_DIR/wandb/          wandb run files: offline unless WANDB_MODE is set
                                (`wandb sync LOGGING_DIR/wandb/offline-run-*` uploads them)

trackio and mlflow are passed to the Trainer's integrations (their own environment variables
choose the project/experiment); scope's per-round figures go to tensorboard and wandb only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
STATE_FILE = "tracking.json"
MAX_STATE_BYTES = 1 << 20
WANDB_PROJECT = "scope"  # when WANDB_PROJECT is not set
STEP_KEY = "train/global_step"  # the x-axis the Trainer's wandb integration defines


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`none` / `tensorboard,wandb` / a list -> the tracker names; unknown names raise."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = tuple(dict.fromkeys(n.strip() for n in items if n.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"report_to: unknown tracker(s) {bad}; use none or a comma list of "
                         f"{', '.join(TRACKERS)}")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to={name} needs the {name} package: pip install {name}")
    return names


def trainer_report_to(names: tuple[str, ...]) -> list[str]:
    """The integrations `TrainingArguments.report_to` creates itself (tensorboard is added by
    `Tracker.trainer_callbacks` with its log folder: transformers would write it under the
    trainer's scratch output_dir)."""
    return [n for n in names if n != "tensorboard"] or ["none"]


class Tracker:
    """scope's figures into the tracker run of `logging_dir` (use as a context manager).

    `main=False` (a non-main process of a multi-process run) makes every call a no-op.
    """

    def __init__(self, report_to: str | list[str] | tuple[str, ...] | None, logging_dir: str,
                 run_name: str | None = None, main: bool = True) -> None:
        self.names = parse_report_to(report_to) if main else ()
        self.dir = Path(logging_dir)
        self.run_name = run_name
        self.tb: Any = None
        self.wandb: Any = None

    @property
    def active(self) -> bool:
        return bool(self.names)

    # -- the run's state file ---------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        path = self.dir / STATE_FILE
        if not path.is_file():
            return {}
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
        try:
            state = json.loads(data) if len(data) <= MAX_STATE_BYTES else None
        except ValueError:
            state = None
        if not (isinstance(state, dict) and isinstance(state.get("run_id", ""), str)
                and isinstance(state.get("logged", []), list)):
            raise ValueError(f"{path}: not a tracker state file (a JSON object with run_id and "
                             "logged); move it away to start a new tracker run")
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.dir / STATE_FILE)

    def logged(self, key: str) -> bool:
        """Whether `mark(key)` was called in this folder (by any process, any round)."""
        return key in self._state().get("logged", [])

    def mark(self, key: str) -> None:
        if not self.active:
            return
        state = self._state()
        state["logged"] = [*state.get("logged", []), key]
        self._save_state(state)

    def run_id(self) -> str:
        """The folder's tracker run id (created on first use)."""
        state = self._state()
        if "run_id" not in state:
            state["run_id"] = uuid.uuid4().hex[:12]
            self._save_state(state)
        return str(state["run_id"])

    # -- opening and closing ----------------------------------------------------------------
    def __enter__(self) -> Tracker:
        if "wandb" in self.names:
            import wandb

            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=self.run_name,
                id=self.run_id(), resume="allow", dir=str(self.dir),
                mode=os.environ.get("WANDB_MODE") or "offline")
            self.wandb.define_metric(STEP_KEY)
            self.wandb.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if exc and exc[0] is not None else 0)
            self.wandb = None

    def _writer(self) -> Any:
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        return self.tb

    def trainer_callbacks(self) -> list[Any]:
        """The Trainer's tensorboard callback, writing LOGGING_DIR/tensorboard."""
        if "tensorboard" not in self.names:
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(SummaryWriter(log_dir=str(self.dir / "tensorboard")))]

    # -- logging ------------------------------------------------------------------------------
    def log(self, values: dict[str, Any], step: int) -> dict[str, float]:
        """Log the finite numbers of `values` at `step`; returns what was logged."""
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if "tensorboard" in self.names:
            writer = self._writer()
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, STEP_KEY: step})
        return scalars

    def histogram(self, tag: str, counts: list[int], step: int) -> None:
        """A histogram of integer positions: counts[k] values equal to k (bins k-0.5..k+0.5)."""
        if not counts or sum(counts) == 0:
            return
        edges = [k - 0.5 for k in range(len(counts) + 1)]
        if "tensorboard" in self.names:
            nonzero = [k for k, c in enumerate(counts) if c]
            total = sum(counts)
            self._writer().add_histogram_raw(
                tag, min=nonzero[0], max=nonzero[-1], num=total,
                sum=sum(k * c for k, c in enumerate(counts)),
                sum_squares=sum(k * k * c for k, c in enumerate(counts)),
                bucket_limits=edges[1:], bucket_counts=list(counts), global_step=step)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Histogram(np_histogram=(list(counts), edges)),
                            STEP_KEY: step})
