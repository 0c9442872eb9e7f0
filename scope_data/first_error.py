"""First-error location from step scores, threshold tuning, and the ProcessBench metric.

Step k of a response has score p_k = P(step k is correct). With threshold tau the predicted first
error is

    k* = min{k : p_k < tau}   (-1 when no step is below tau)

NaN scores (a model overflow, or a step cut off by the PRM's context) are never errors.
:func:`locate_determined` is the conservative variant the score stage uses: it returns None
when a NaN comes before the located step (or anywhere, when none is found), because then the
true first error may hide in the unscored step.

ProcessBench metric (Zheng et al. 2024, arXiv 2412.06559), per subset: accuracy on erroneous
samples (gold label != -1; a prediction counts only if the index is exactly equal), accuracy on
correct samples (gold -1, prediction -1), F1 = 2 * acc_err * acc_corr / (acc_err + acc_corr);
the reported figure is the mean F1 over subsets. All figures are percentages.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def locate(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step whose (finite) score is below ``threshold``; -1 if none."""
    for k, p in enumerate(scores):
        if _finite(p) and p < threshold:
            return k
    return -1


def locate_determined(scores: Sequence[float], threshold: float) -> int | None:
    """Like :func:`locate`, but None when a non-finite score could hide an earlier error."""
    k = locate(scores, threshold)
    upto = len(scores) if k == -1 else k
    if any(not _finite(p) for p in scores[:upto]):
        return None
    return k


@dataclass(frozen=True)
class SubsetMetrics:
    """ProcessBench figures for one subset (percentages)."""

    name: str
    n_erroneous: int
    n_correct: int
    acc_erroneous: float
    acc_correct: float
    f1: float

    def as_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


def f1_score(acc_erroneous: float, acc_correct: float) -> float:
    """Harmonic mean of the two accuracies (0 when both are 0)."""
    total = acc_erroneous + acc_correct
    return 0.0 if total == 0 else 2 * acc_erroneous * acc_correct / total


def subset_metrics(name: str, predictions: Sequence[int], labels: Sequence[int]) -> SubsetMetrics:
    """Accuracy on erroneous and correct samples and their F1, in percent.

    A subset without one of the two classes reports that accuracy as NaN and F1 equal to the
    other accuracy (ProcessBench subsets always have both; scored arith tables may not).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(labels)} labels")
    err = [p == g for p, g in zip(predictions, labels, strict=True) if g != -1]
    cor = [p == -1 for p, g in zip(predictions, labels, strict=True) if g == -1]
    acc_err = 100.0 * sum(err) / len(err) if err else math.nan
    acc_cor = 100.0 * sum(cor) / len(cor) if cor else math.nan
    if err and cor:
        f1 = f1_score(acc_err, acc_cor)
    else:
        f1 = acc_err if err else acc_cor if cor else math.nan
    return SubsetMetrics(name, len(err), len(cor), acc_err, acc_cor, f1)


def average_f1(subsets: Iterable[SubsetMetrics]) -> float:
    """Mean F1 over subsets (the ProcessBench headline figure)."""
    values = [s.f1 for s in subsets]
    return sum(values) / len(values) if values else math.nan


def _correct_interval(scores: Sequence[float], label: int) -> tuple[float, float] | None:
    """The thresholds tau in (lo, hi] for which ``locate(scores, tau) == label``; None if none.

    label -1: every finite score >= tau, so (-inf, min p]. label g >= 0: p_g < tau and every
    earlier finite score >= tau, so (p_g, min(p_0..p_{g-1})].
    """
    if label == -1:
        finite = [p for p in scores if _finite(p)]
        return (-math.inf, min(finite) if finite else math.inf)
    if label >= len(scores) or not _finite(scores[label]):
        return None
    earlier = [p for p in scores[:label] if _finite(p)]
    hi = min(earlier) if earlier else math.inf
    lo = scores[label]
    return (lo, hi) if lo < hi else None


def tune_threshold(
    labelled: Sequence[tuple[Sequence[float], int]], default: float = 0.5
) -> float:
    """The threshold maximising ProcessBench F1 on ``labelled`` = [(step scores, gold label)].

    Each sample is predicted right on an interval (lo, hi] of thresholds, so the best F1 is
    reached at one of the finite interval ends ``hi`` (or just above every score). Ties go to
    the candidate closest to ``default``. Without both classes, the present class's accuracy
    is maximised. Empty input returns ``default``.
    """
    intervals_err: list[tuple[float, float]] = []
    intervals_cor: list[tuple[float, float]] = []
    n_err = n_cor = 0
    finite_scores: list[float] = []
    for scores, label in labelled:
        finite_scores.extend(p for p in scores if _finite(p))
        if label == -1:
            n_cor += 1
        else:
            n_err += 1
        interval = _correct_interval(scores, label)
        if interval is not None:
            (intervals_cor if label == -1 else intervals_err).append(interval)
    if not finite_scores or (n_err == 0 and n_cor == 0):
        return default
    candidates = {hi for _, hi in intervals_err + intervals_cor if math.isfinite(hi)}
    candidates.add(math.nextafter(max(finite_scores), math.inf))
    candidates.add(default)

    def covering(intervals: list[tuple[float, float]]) -> Callable[[float], int]:
        # #{lo < tau <= hi} = #{lo < tau} - #{hi < tau}  (every interval has lo < hi)
        los = sorted(lo for lo, _ in intervals)
        his = sorted(hi for _, hi in intervals)
        return lambda tau: bisect_left(los, tau) - bisect_left(his, tau)

    count_err, count_cor = covering(intervals_err), covering(intervals_cor)

    def score(tau: float) -> float:
        a = 100.0 * count_err(tau) / n_err if n_err else None
        c = 100.0 * count_cor(tau) / n_cor if n_cor else None
        if a is not None and c is not None:
            return f1_score(a, c)
        return a if a is not None else c  # type: ignore[return-value]

    return max(sorted(candidates), key=lambda t: (score(t), -abs(t - default)))
