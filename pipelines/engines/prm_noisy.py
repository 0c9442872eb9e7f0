"""`noisy:<prm>?f1=F&seed=S`: any PRM with seeded step-label noise calibrated to a target
ProcessBench first-error F1 against its own labels (`scope_data.label_noise`).

The inner PRM scores the steps; its scores become 1.0 / 0.0 labels (score >= 0.5), and each
label is flipped with the per-item rate that makes the expected F1 equal F. The noise of an
item depends only on S, the problem and the steps (never on the batch). Statuses and NaN
scores of the inner PRM pass through. Engine options go to the inner PRM.
"""

from __future__ import annotations

from typing import Any

from pipelines.engines.base import PRMScores, load_prm, score_with_status
from pipelines.engines.spec import EngineSpec, noisy_params
from scope_data.label_noise import item_rng, noisy_labels


class NoisyPRM:
    """The inner PRM of a `noisy:` spec, its labels flipped (see the module docstring)."""

    def __init__(self, spec: EngineSpec, **options: Any):
        inner, params = noisy_params(spec)
        self.spec = spec
        self.f1, self.seed = float(params["f1"]), int(params["seed"])
        self.inner = load_prm(inner, **options)
        self.max_length = self.inner.max_length

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        return [r.scores for r in self.score_batch_with_status(items)]

    def score_batch_with_status(self, items: list[tuple[str, list[str]]]) -> list[PRMScores]:
        out = []
        for (problem, steps), res in zip(items, score_with_status(self.inner, items),
                                         strict=True):
            rng = item_rng(self.seed, problem, steps)
            out.append(PRMScores(noisy_labels(res.scores, self.f1, rng), res.status))
        return out

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
