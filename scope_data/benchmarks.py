"""PRM benchmarks: labelled (problem, steps, first wrong step) items for first-error evaluation.

A benchmark is a ProcessBench-format JSON/JSONL file (records with ``problem``, ``steps`` and
``label`` = index of the first wrong step, -1 if none) or a table folder of rollouts of an exact
task (``arith``, ``countdown``; rollouts or scored), labelled by the task's exact checker
(``first_error``) with the response lines as steps. Table rows whose gold index lies past their
last step (an unfinished response) cannot be located by any PRM and are left out (counted in
``excluded``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    from scope_data.tasks import EXACT_TASKS, task_module

    manifest = read_manifest(url, storage_options)
    table = read_arrow(url, storage_options)
    rows = table.to_pylist()
    items, stored, excluded = [], [], 0
    has_scores = manifest.table in ("scored", "corrected") and "steps" in table.column_names
    for i, r in enumerate(rows):
        task = task_module(r.get("task"))
        if task is None:
            raise ValueError(f"{url}: row {i} (rollout {r.get('rollout_id')}) is task "
                             f"{r.get('task')!r}; table benchmarks need rollouts of an exact "
                             f"task ({', '.join(EXACT_TASKS)})")
        problem = task.parse_prompt(r["prompt"])
        steps = task.response_lines(r["response_text"])
        gold = task.first_error(problem, r["response_text"])
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
    """A ProcessBench-format file, or a table folder (has a manifest) of exact-task rollouts."""
    from scope_data.shards import is_table

    if Path(path).is_file():
        return _load_processbench(path)
    if is_table(path, storage_options):
        return _load_table(path, storage_options)
    raise FileNotFoundError(f"benchmark {path}: neither a ProcessBench JSON file nor a table")
