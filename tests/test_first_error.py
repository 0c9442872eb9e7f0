"""First-error location, threshold tuning and the ProcessBench metric."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_data.first_error import (
    average_f1,
    f1_score,
    locate,
    locate_determined,
    subset_metrics,
    tune_threshold,
)

NAN = math.nan


def test_locate_first_step_below_threshold() -> None:
    assert locate([0.9, 0.8, 0.2, 0.1], 0.5) == 2
    assert locate([0.9, 0.8], 0.5) == -1
    assert locate([], 0.5) == -1
    assert locate([0.5, 0.49], 0.5) == 1  # strictly below
    assert locate([0.3], 0.2) == -1


def test_nan_is_never_an_error() -> None:
    assert locate([NAN, 0.9, 0.1], 0.5) == 2
    assert locate([NAN, NAN], 0.5) == -1
    assert locate([math.inf, -math.inf, 0.1], 0.5) == 2
    # the conservative variant refuses to answer when a NaN could hide an earlier error
    assert locate_determined([0.9, NAN, 0.1], 0.5) is None
    assert locate_determined([0.9, NAN], 0.5) is None
    assert locate_determined([0.1, NAN], 0.5) == 0
    assert locate_determined([0.9, 0.8], 0.5) == -1


def test_subset_metrics_against_hand_computation() -> None:
    labels = [-1, -1, -1, 2, 0, 1, 3]
    preds = [-1, 0, -1, 2, 1, 1, -1]
    m = subset_metrics("x", preds, labels)
    acc_err = 100 * 2 / 4  # labels 2 and 1 matched
    acc_cor = 100 * 2 / 3
    assert (m.n_erroneous, m.n_correct) == (4, 3)
    assert m.acc_erroneous == pytest.approx(acc_err)
    assert m.acc_correct == pytest.approx(acc_cor)
    assert m.f1 == pytest.approx(2 * acc_err * acc_cor / (acc_err + acc_cor))
    assert f1_score(0.0, 0.0) == 0.0
    assert average_f1([m, subset_metrics("y", [-1], [-1])]) == pytest.approx((m.f1 + 100) / 2)
    one_class = subset_metrics("z", [0, 1], [0, 2])
    assert math.isnan(one_class.acc_correct) and one_class.f1 == pytest.approx(50.0)


def _f1_at(labelled: list[tuple[list[float], int]], tau: float) -> float:
    preds = [locate(s, tau) for s, _ in labelled]
    return subset_metrics("t", preds, [g for _, g in labelled]).f1


def test_tune_threshold_finds_the_separating_value() -> None:
    labelled = [([0.9, 0.7, 0.3], 2), ([0.95, 0.6], -1), ([0.4, 0.9], 0), ([0.8, 0.65], -1)]
    tau = tune_threshold(labelled)
    assert _f1_at(labelled, tau) == pytest.approx(100.0)
    assert 0.4 < tau <= 0.6


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_tuned_threshold_beats_every_grid_value(seed: int) -> None:
    rng = random.Random(seed)
    labelled = []
    for _ in range(rng.randint(1, 25)):
        n = rng.randint(1, 6)
        scores = [rng.choice([rng.random(), round(rng.random(), 1), NAN]) for _ in range(n)]
        labelled.append((scores, rng.randint(-1, n)))
    tau = tune_threshold(labelled)
    best = _f1_at(labelled, tau)
    finite = sorted({x for s, _ in labelled for x in s if not math.isnan(x)})
    grid = [i / 50 for i in range(-1, 52)] + finite + [math.nextafter(x, 2) for x in finite]
    for t in grid:
        f = _f1_at(labelled, t)
        assert math.isnan(f) or f <= best + 1e-9
