"""Seeded step-label noise calibrated to a ProcessBench first-error F1 (the `noisy:` PRM).

A PRM's step scores p_1..p_n become labels l_k = [p_k >= 1/2] (NaN stays NaN: never an error).
Its first error is g = min{k : l_k = 0} (-1 if none). The noisy PRM flips each label with
probability r, independently, and its first error is the first flipped-or-kept 0.

Calibration. ProcessBench counts an item right iff the predicted first error equals the
reference one (:mod:`scope_data.first_error`). Against the inner labels, the noisy prediction
is right iff none of the m *decisive* labels flipped: the labelled steps up to and including g
(m = their count; an item with no error: every labelled step). So

    P(item right) = (1 - r)^m.

Choosing, per item, r = 1 - F^(1/m) makes P(item right) = F for every item, whatever its
length or error position, so the expected accuracy on erroneous items and on correct items are
both F, and so is their harmonic mean: the ProcessBench F1 of the noisy PRM against the inner
labels is F up to sampling error (its standard deviation is about sqrt(F(1-F)/N) for N items,
0.015 at F = 0.7, N = 1,000). A single rate for all items would make F1 depend on the length
and error-position mix of the data. Labels after g are flipped at the same rate r (noise
that the first-error metric does not see). An item with no labelled step (m = 0) is unchanged.

Vs. gold labels, the F1 is F when the inner PRM is exact (``rule:<task>``), lower otherwise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def flip_rate(m: int, f1: float) -> float:
    """The per-label flip rate that keeps m decisive labels all unflipped with probability
    ``f1``: 1 - f1^(1/m) (0 for m = 0)."""
    if not 0 <= f1 <= 1:
        raise ValueError(f"f1 must be in [0, 1], got {f1}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    return 0.0 if m == 0 else 1.0 - f1 ** (1.0 / m)


def labels(scores: Sequence[float], threshold: float = 0.5) -> list[float]:
    """1.0 / 0.0 per step (score >= threshold), NaN for a non-finite score."""
    return [math.nan if x is None or not math.isfinite(x) else float(x >= threshold)
            for x in scores]


def decisive_steps(step_labels: Sequence[float]) -> int:
    """m: the labelled (non-NaN) steps up to and including the first 0, or all of them."""
    m = 0
    for x in step_labels:
        if math.isnan(x):
            continue
        m += 1
        if x == 0.0:
            break
    return m


def noisy_labels(scores: Sequence[float], f1: float, rng: random.Random,
                 threshold: float = 0.5) -> list[float]:
    """The labels of ``scores`` with each labelled step flipped at the calibrated rate
    ``flip_rate(decisive_steps, f1)`` (see the module docstring), drawn from ``rng``."""
    out = labels(scores, threshold)
    rate = flip_rate(decisive_steps(out), f1)
    for k, x in enumerate(out):
        if not math.isnan(x) and rng.random() < rate:
            out[k] = 1.0 - x
    return out


def item_rng(seed: int, problem: str, steps: Sequence[str]) -> random.Random:
    """The noise source of one (problem, steps) item: the same item always gets the same noise,
    whatever batch it comes in."""
    return random.Random("\x1e".join([f"noisy:{seed}", problem, *steps]))
