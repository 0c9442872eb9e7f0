"""A trainer kept in memory across `scope train` calls of one process (the online train worker).

Offline, each round's `scope train` loads the policy from the previous round's folder and the
optimizer, scheduler, RNG and step from its `trainer_state/` (`--resume-from`). Inside
`training_session()`, a call that continues the previous call of the same process (its
`--resume-from` and `--policy` are that call's output folder) takes the trained model and
those states from memory instead: the model object itself, the optimizer state tensors by
reference (`load_state_dict` copies none), the scheduler state and the RNG states as they were
when the previous call saved them. Nothing else changes: every call still writes its HF folder
and `trainer_state/` (a restarted worker continues from disk with the same results), and the
updates are the same bits as the disk path's (float32 weights and states round-trip exactly).

A call that does not continue the kept one (the first call, a restart, a round that trained
nothing, LoRA: each round merges its adapters and starts new ones) loads from disk as
offline. A failed call drops the kept state (its model may be half-updated).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.training.state import (
    OPTIMIZER,
    RNG,
    SCHEDULER,
    STATE_DIR,
    Kept,
    check_meta,
    get_rng_state,
    state_meta,
)

_ACTIVE: TrainSession | None = None


class TrainSession:
    """The state the last `scope train` call of this process left; `stats` counts calls that
    took it from memory (`reuses`) and calls that loaded from disk (`loads`)."""

    def __init__(self) -> None:
        self.kept: Kept | None = None
        self.stats = {"loads": 0, "reuses": 0}

    def take(self, cfg: Any) -> Kept | None:
        """The kept state if `cfg` continues the call that left it (else None: load from
        disk); the session holds nothing until this call succeeds."""
        from pipelines.engines.spec import trainable_path

        kept, self.kept = self.kept, None
        if kept is not None and not cfg.lora and cfg.resume_from:
            prev = kept.folder.parent
            if _same(cfg.resume_from, prev) and _same(trainable_path(cfg.policy), prev):
                check_meta(cfg.resume_from, kept.meta, cfg)
                self.stats["reuses"] += 1
                return kept
        self.stats["loads"] += 1
        return None

    @contextlib.contextmanager
    def keeping(self, cfg: Any, trainer: Any) -> Iterator[None]:
        """Around the save of a finished call: its state is taken as the save sees it and kept
        once the save succeeded."""
        acc = trainer.accelerator
        if (cfg.lora or acc.num_processes > 1 or trainer.is_deepspeed_enabled
                or trainer.is_fsdp_enabled):
            yield
            return
        model = acc.unwrap_model(trainer.model)
        states = {OPTIMIZER: trainer.optimizer.state_dict(),
                  SCHEDULER: copy.deepcopy(trainer.lr_scheduler.state_dict()),
                  RNG: get_rng_state()}
        meta = state_meta(trainer.state.global_step, cfg, model)
        yield
        model.eval()  # as from_pretrained returns it
        self.kept = Kept(Path(cfg.output_dir).expanduser().resolve() / STATE_DIR, meta,
                         states, model)


def _same(a: str | Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == b


def active() -> TrainSession | None:
    """The session of the enclosing `training_session()` context, if any."""
    return _ACTIVE


@contextlib.contextmanager
def training_session() -> Iterator[TrainSession]:
    """Keep the trainer's model and states in memory between calls until the context ends."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, TrainSession()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = outer
