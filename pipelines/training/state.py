"""Trainer state that continues across rounds: `TRAIN_DIR/trainer_state/` (docs/training.md).

A `scope train` output folder holds, besides the model, what a later call needs to continue the
same optimisation: the optimizer and LR-scheduler state dicts, the RNG states (python `random`,
numpy, torch CPU and CUDA) and the global optimizer step, plus `state.json` (the schedule
settings and a signature of the trainable parameters). Every file is written with `torch.save`
of tensors, numbers and strings only, so `torch.load(weights_only=True)` reads it with no
allow-listing (RNG states are turned into tensors and ints first). `--resume-from DIR` loads it
(`load_carried`); the policy's weights still come from `--policy`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_DIR = "trainer_state"
META = "state.json"
OPTIMIZER, SCHEDULER, RNG = "optimizer.pt", "scheduler.pt", "rng.pt"
FORMAT = 1
# options that must match for the carried optimizer and schedule to continue (cfg field names)
SCHEDULE_KEYS = ("schedule_steps", "lr_scheduler_type", "warmup_steps", "learning_rate",
                 "optim", "weight_decay", "lora")


def schedule_identity(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SCHEDULE_KEYS}


def param_signature(model: Any) -> dict[str, Any]:
    """Count and hash of the trainable parameters' (name, shape): what an optimizer state fits."""
    names = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return {"tensors": len(names), "hash": digest}


@dataclass
class Carried:
    """A previous train output's state, checked against this call's config."""

    folder: Path
    meta: dict[str, Any]

    @property
    def global_step(self) -> int:
        return int(self.meta["global_step"])

    def _load(self, name: str) -> Any:
        return torch.load(self.folder / name, map_location="cpu", weights_only=True)

    def check_model(self, model: Any) -> None:
        """Refuse an optimizer state saved for other trainable parameters (e.g. lora vs full)."""
        mine, theirs = param_signature(model), self.meta["params"]
        if mine != theirs:
            raise ValueError(
                f"resume_from {self.folder.parent}: its optimizer state is for another set of "
                f"trainable parameters ({theirs['tensors']} tensors, lora="
                f"{self.meta['schedule']['lora']}) than this model's ({mine['tensors']} tensors); "
                "train the same kind of model, or without --resume-from")

    def restore(self, optimizer: Any, scheduler: Any) -> None:
        """Load the optimizer and scheduler states; the LR is then the schedule's at the carried
        step (the schedule functions are rebuilt from this call's options, not pickled)."""
        optimizer.load_state_dict(self._load(OPTIMIZER))  # in memory (Kept): no tensor copied
        scheduler.load_state_dict(self._load(SCHEDULER))
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * f(scheduler.last_epoch)
                   for base, f in zip(scheduler.base_lrs, lambdas, strict=True)]
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def restore_rng(self) -> None:
        set_rng_state(self._load(RNG))


@dataclass
class Kept(Carried):
    """The state a call left in memory (`pipelines.training.session`): the same files' content
    as `trainer_state/` of `folder.parent`, plus the trained model itself."""

    states: dict[str, Any]
    model: Any

    def _load(self, name: str) -> Any:
        return self.states[name]


def has_state(train_dir: str) -> bool:
    """True if the `scope train` output `train_dir` holds a trainer state to continue."""
    return (Path(train_dir).expanduser() / STATE_DIR / META).is_file()


def load_carried(resume_from: str, cfg: Any) -> Carried:
    """The state saved in `resume_from` (a `scope train` output), or ValueError naming what
    does not match this config."""
    folder = Path(resume_from).expanduser() / STATE_DIR
    meta_path = folder / META
    if not meta_path.is_file():
        raise ValueError(f"resume_from {resume_from}: no {STATE_DIR}/{META} (not a `scope train` "
                         "output, or one written without carried state); train without it "
                         "(in a recipe: train: {carry_state: false})")
    meta = json.loads(meta_path.read_text())
    check_meta(resume_from, meta, cfg)
    return Carried(folder, meta)


def check_meta(resume_from: str, meta: dict[str, Any], cfg: Any) -> None:
    """ValueError naming the first schedule setting of `meta` that differs from `cfg`'s."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"resume_from {resume_from}: {STATE_DIR} format {meta.get('format')!r}"
                         f", this version reads {FORMAT}")
    mine = schedule_identity(cfg)
    for key, value in mine.items():
        if meta["schedule"].get(key) != value:
            raise ValueError(
                f"resume_from {resume_from}: {key} is {value!r} here but "
                f"{meta['schedule'].get(key)!r} in its {STATE_DIR} (the carried optimizer and "
                "schedule continue only with the same value)")


def save_state(folder: Path, optimizer: Any, scheduler: Any, global_step: int, cfg: Any,
               model: Any) -> None:
    """Write the state of a finished call into `folder` (inside the not-yet-renamed output)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER)
    torch.save(scheduler.state_dict(), folder / SCHEDULER)
    torch.save(get_rng_state(), folder / RNG)
    (folder / META).write_text(json.dumps(state_meta(global_step, cfg, model), indent=1))


def state_meta(global_step: int, cfg: Any, model: Any) -> dict[str, Any]:
    """`state.json`: the step, the schedule settings and the trainable parameters' signature."""
    return {"format": FORMAT, "global_step": global_step, "schedule": schedule_identity(cfg),
            "params": param_signature(model)}


def get_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and ints (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
