"""`scope prm-eval`: first-error location quality of a PRM, ProcessBench protocol.

Each benchmark is one subset: a ProcessBench-format JSON file (records with ``problem``,
``steps`` and ``label`` = index of the first wrong step, -1 if none) or a table folder of arith
rollouts (rollouts or scored), where the gold label is the exact checker's
``arith.first_error`` and the steps are the response lines. Rows of a table whose gold index
lies past their last step (an unfinished response: the missing step is the error) cannot be
located by any PRM and are left out (counted). A scored table can be evaluated with the scores
it holds (no ``prm``; rows without scores are left out) or re-scored with ``prm``.

Prediction: first step with score < tau (NaN never an error), -1 if none. ``threshold="auto"``
tunes tau for F1 on the FIRST benchmark and applies it to all of them (ProcessBench tunes on
GSM8K). Figures: accuracy on erroneous samples, on correct samples, their harmonic mean F1,
and the average F1 over subsets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.engines.base import PRMEngine, load_prm, score_with_status
from scope_data.first_error import (
    SubsetMetrics,
    average_f1,
    locate,
    subset_metrics,
    tune_threshold,
)


@dataclass
class Benchmark:
    """One subset: (problem, steps, gold label) items, optional stored scores."""

    name: str
    path: str
    items: list[tuple[str, list[str], int]]
    stored_scores: list[list[float]] | None = None
    excluded: int = 0


def _subset_name(path: str) -> str:
    stem = Path(path.rstrip("/")).name
    for suffix in (".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("processbench.")


def _load_processbench(path: str) -> Benchmark:
    text = Path(path).read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of ProcessBench records")
    items = []
    for i, r in enumerate(records):
        missing = [k for k in ("problem", "steps", "label") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} has no {', '.join(missing)}")
        steps, label = r["steps"], r["label"]
        if not isinstance(steps, list) or not isinstance(label, int) or label < -1:
            raise ValueError(f"{path}: record {i}: steps must be a list and label an int >= -1")
        items.append((str(r["problem"]), [str(s) for s in steps], label))
    return Benchmark(_subset_name(path), path, items)


def _load_table(url: str, storage_options: dict[str, Any] | None) -> Benchmark:
    from scope_data.shards import read_arrow, read_manifest
    from scope_data.tasks import arith

    manifest = read_manifest(url, storage_options)
    table = read_arrow(url, storage_options)
    rows = table.to_pylist()
    items, stored, excluded = [], [], 0
    has_scores = manifest.table in ("scored", "corrected") and "steps" in table.column_names
    for i, r in enumerate(rows):
        if r.get("task") != "arith":
            raise ValueError(f"{url}: row {i} (rollout {r.get('rollout_id')}) is task "
                             f"{r.get('task')!r}; table benchmarks need arith rollouts")
        problem = arith.parse_prompt(r["prompt"])
        steps = arith.response_lines(r["response_text"])
        gold = arith.first_error(problem, r["response_text"])
        scores = None
        if has_scores:
            if r["score_status"] in ("skipped", "no_steps") or len(r["steps"]) != len(steps):
                scores = None
            else:
                scores = [math.nan if s["score"] is None else s["score"] for s in r["steps"]]
        if gold >= len(steps) or not steps:
            excluded += 1
            continue
        items.append((r["prompt"], steps, gold))
        stored.append(scores)
    bench = Benchmark(_subset_name(url), url, items, excluded=excluded)
    if has_scores:
        bench.stored_scores = stored  # type: ignore[assignment]
    return bench


def load_benchmark(path: str, storage_options: dict[str, Any] | None = None) -> Benchmark:
    """A ProcessBench-format file, or a table folder (has a manifest) of arith rollouts."""
    from scope_data.shards import is_table

    if Path(path).is_file():
        return _load_processbench(path)
    if is_table(path, storage_options):
        return _load_table(path, storage_options)
    raise FileNotFoundError(f"benchmark {path}: neither a ProcessBench JSON file nor a table")


@dataclass
class PRMEvalConfig:
    """Options of `scope prm-eval`."""

    benchmarks: list[str]
    prm: str | None = None
    threshold: float | str = 0.5
    prm_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None  # first N items of each benchmark (quick looks)
    storage_options: dict[str, Any] | None = None


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
