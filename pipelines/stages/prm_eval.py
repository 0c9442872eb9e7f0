"""`scope prm-eval`: first-error location quality of a PRM, ProcessBench protocol.

Each benchmark is one subset: a ProcessBench-format JSON file (records with ``problem``,
``steps`` and ``label`` = index of the first wrong step, -1 if none) or a table folder of arith
or countdown rollouts (rollouts or scored), where the gold label is the task's exact checker's
``first_error`` and the steps are the response lines. Rows of a table whose gold index
lies past their last step (an unfinished response: the missing step is the error) cannot be
located by any PRM and are left out (counted). A scored table can be evaluated with the scores
it holds (no ``prm``; rows without scores are left out) or re-scored with ``prm``.

Prediction: first step with score < tau (NaN never an error), -1 if none. ``threshold="auto"``
tunes tau for F1 on the FIRST benchmark and applies it to all of them (ProcessBench tunes on
GSM8K). Figures: accuracy on erroneous samples, on correct samples, their harmonic mean F1,
and the average F1 over subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines.config import option, storage_options_field
from pipelines.engines.base import PRMEngine, load_prm, score_with_status
from pipelines.engines.prm_options import PRM_HELP, PRM_OPTIONS_HELP, PRMOptions
from scope_data.benchmarks import Benchmark, load_benchmark
from scope_data.first_error import (
    SubsetMetrics,
    average_f1,
    locate,
    subset_metrics,
    tune_threshold,
)


@dataclass
class PRMEvalConfig:
    """Options of `scope prm-eval`."""

    benchmarks: list[str] = option(
        flags="--benchmark", help="ProcessBench-format JSON file, or a table of arith/countdown "
        "rollouts (gold = the exact checker); repeat for several subsets")
    prm: str | None = option(
        None, help=PRM_HELP + " (omit to use the scores stored in a scored table)")
    threshold: float | str = option(
        0.5, help="number, or 'auto': tuned for F1 on the first benchmark, applied to all")
    prm_options: dict[str, Any] = option(default_factory=dict, expand=PRMOptions,
                                         help=PRM_OPTIONS_HELP)
    limit: int | None = option(None, help="only the first N items per benchmark")
    storage_options: dict[str, Any] | None = storage_options_field()


@dataclass
class PRMEvalResult:
    prm: str
    threshold: float
    subsets: list[SubsetMetrics]
    average_f1: float
    excluded: dict[str, int]
    predictions: dict[str, list[int]]
    statuses: dict[str, dict[str, int]]  # per subset: rows the PRM did not fully score

    def as_dict(self) -> dict[str, Any]:
        return {"prm": self.prm, "threshold": self.threshold, "average_f1": self.average_f1,
                "subsets": [s.as_dict() for s in self.subsets], "excluded": self.excluded,
                "statuses": self.statuses}


def _scores(
    prm: PRMEngine | None, bench: Benchmark, batch: int = 256
) -> tuple[list[list[float]], dict[str, int]]:
    """Step scores of every item and the counts of non-"ok" PRM statuses."""
    if prm is None:
        if bench.stored_scores is None:
            raise ValueError(f"benchmark {bench.path} holds no step scores: pass --prm SPEC")
        scores = [s if s is not None else [math.nan] * len(items[1])
                  for s, items in zip(bench.stored_scores, bench.items, strict=True)]
        return scores, {"unscored": sum(s is None for s in bench.stored_scores)}
    out: list[list[float]] = []
    statuses: dict[str, int] = {}
    for start in range(0, len(bench.items), batch):
        chunk = [(p, s) for p, s, _ in bench.items[start : start + batch]]
        for r in score_with_status(prm, chunk):
            out.append(r.scores)
            if r.status != "ok":
                statuses[r.status] = statuses.get(r.status, 0) + 1
    return out, statuses


def evaluate(
    prm: PRMEngine | None, benchmarks: list[Benchmark], threshold: float | str = 0.5
) -> PRMEvalResult:
    """Score every benchmark and compute the ProcessBench figures (see module docstring)."""
    if not benchmarks:
        raise ValueError("give at least one --benchmark")
    runs = [_scores(prm, b) for b in benchmarks]
    scored = [scores for scores, _ in runs]
    if threshold == "auto":
        first = benchmarks[0]
        tau = tune_threshold(
            [(s, g) for s, (_, _, g) in zip(scored[0], first.items, strict=True)]
        )
    else:
        tau = float(threshold)
    subsets, preds = [], {}
    for bench, scores in zip(benchmarks, scored, strict=True):
        p = [locate(s, tau) for s in scores]
        preds[bench.name] = p
        subsets.append(subset_metrics(bench.name, p, [g for _, _, g in bench.items]))
    name = str(prm.spec) if prm is not None else "stored scores"
    return PRMEvalResult(name, tau, subsets, average_f1(subsets),
                         {b.name: b.excluded for b in benchmarks}, preds,
                         {b.name: st for b, (_, st) in zip(benchmarks, runs, strict=True)})


def run(cfg: PRMEvalConfig, prm: PRMEngine | None = None) -> PRMEvalResult:
    """Load the benchmarks (and the PRM from `cfg.prm` unless given) and evaluate."""
    if cfg.threshold != "auto":
        try:
            float(cfg.threshold)
        except (TypeError, ValueError):
            raise ValueError(
                f"--threshold must be a number or 'auto', got {cfg.threshold!r}"
            ) from None
    benches = [load_benchmark(p, cfg.storage_options) for p in cfg.benchmarks]
    if cfg.limit is not None:
        for b in benches:
            b.items = b.items[: cfg.limit]
            if b.stored_scores is not None:
                b.stored_scores = b.stored_scores[: cfg.limit]
    if prm is None and cfg.prm:
        prm = load_prm(cfg.prm, **cfg.prm_options)
    return evaluate(prm, benches, cfg.threshold)


def print_result(result: PRMEvalResult) -> None:
    """The per-subset table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prm-eval: {result.prm} (threshold {result.threshold:.4g})",
                  title_justify="left")
    for col in ("subset", "erroneous", "correct", "acc. erroneous", "acc. correct", "F1",
                "left out", "not fully scored"):
        table.add_column(col, justify="left" if col == "subset" else "right")
    for s in result.subsets:
        table.add_row(s.name, str(s.n_erroneous), str(s.n_correct), f"{s.acc_erroneous:.1f}",
                      f"{s.acc_correct:.1f}", f"{s.f1:.1f}", str(result.excluded[s.name]),
                      ", ".join(f"{k} {v}" for k, v in result.statuses[s.name].items()) or "-")
    table.add_row("average", "", "", "", "", f"{result.average_f1:.1f}", "", "")
    Console().print(table)
