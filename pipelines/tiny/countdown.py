"""The tiny countdown policy: the arith recipe (`pipelines.tiny.policy`) on the countdown task.

SFT warm start on solutions of generated countdown problems (`scope_data.tasks.countdown`):
each training solution is drawn uniformly among the problem's solution paths (so the policy
learns the spread of right answers), and a share ``error_rate`` carries one injected error,
half arithmetic slips, half dead-end moves (a valid step after which the target cannot be
reached), continued to an answer. Cached by config hash like the arith policy (the default
build ships prebuilt); the accuracy at temperature 1 on held-out problems is measured into
``scope_tiny.json`` (``mix``): 22% for the default (5,000 steps, cosine decay; see
docs/tasks.md for the builds that fell short).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines.tiny.architecture import ModelSize
from pipelines.tiny.policy import EVAL_SEED_OFFSET, RECIPE_VERSION, build_policy
from scope_data.tasks import countdown as cd


@dataclass(frozen=True)
class CountdownTinyConfig(ModelSize):
    """Everything that determines a tiny countdown build (hashed into its cache key)."""

    numbers: int = 4
    modulus: int = 10
    min_solutions: int = 1
    max_solutions: int | None = None
    error_rate: float = 0.3
    seed: int = 0
    max_position_embeddings: int = 128
    max_steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"  # the decay to 0 took the loss from 0.23 (constant) to 0.17
    weight_decay: float = 0.0
    num_examples: int = 20_000
    group_by_length: bool = False
    task: ClassVar[str] = "countdown"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CountdownTinyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def hash(self) -> str:
        """Short stable hash of the config and recipe version."""
        payload = json.dumps({"v": RECIPE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _problems(self, count: int, seed: int) -> list[cd.CountdownProblem]:
        return cd.generate_problems(count, seed=seed, numbers=self.numbers, modulus=self.modulus,
                                    min_solutions=self.min_solutions,
                                    max_solutions=self.max_solutions)

    def training_texts(self) -> list[tuple[str, str]]:
        """``(prompt, completion)`` pairs: uniformly drawn solutions, ``error_rate`` of them
        with one injected slip or dead end."""
        rng = random.Random(f"tiny-countdown-train:{self.seed}")
        pairs = []
        for p in self._problems(self.num_examples, self.seed):
            if rng.random() < self.error_rate:
                text = cd.inject_error(p, rng)[0]
            else:
                text = cd.render(p, cd.sample_path(p.numbers, p.target, p.modulus, rng))
            pairs.append((p.prompt, text))
        return pairs

    def eval_problems(self, n: int, seed: int = 0) -> list[cd.CountdownProblem]:
        """``n`` held-out problems: another seed range than training, no training prompt."""
        seen = {p.prompt for p in self._problems(self.num_examples, self.seed)}
        pool = self._problems(2 * n + 64, EVAL_SEED_OFFSET + self.seed + seed)
        return [p for p in pool if p.prompt not in seen][:n]


def build_tiny_countdown_policy(
    out_dir: str | Path | None = None,
    *,
    eval_problems: int = 256,
    num_threads: int | None = None,
    force: bool = False,
    verbose: bool = False,
    **fields: Any,
) -> Path:
    """Build (or reuse) the tiny countdown policy; ``fields`` set :class:`CountdownTinyConfig`
    fields (None: default). Returns the model folder (see ``policy.build_tiny_policy``)."""
    cfg = CountdownTinyConfig(**{k: v for k, v in fields.items() if v is not None})
    return build_policy(cfg, out_dir, eval_problems=eval_problems, num_threads=num_threads,
                        force=force, verbose=verbose)
