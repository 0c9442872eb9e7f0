"""Group assembly throughput: `scope_data.assembly.assemble` vs the row-loop implementation.

Builds a synthetic corrected table of `--rows` rows in memory: groups of 8 policy rollouts (one
problem each, round 0, rewards 0/1, 32-96 response tokens with their log-probs, 32 prompt
tokens, 0-4 scored steps), and after a failed rollout, with probability `--corrected`, a
``corrected`` row (teacher suffix, NaN log-probs) whose status is mostly ``accepted``, some
``truncated``, ``rejected_wrong`` and ``teacher_error``. Then, in the same run:

- new: `assemble(table, "scope")` over all rows (best of `--repeat`, wall and CPU seconds);
- baseline: the row-loop implementation of commit `--baseline-rev` (the last one before the
  polars rewrite; `scope_data/assembly.py` and `scope_data/advantages.py` loaded from git
  history), timed on the first `--baseline-rows` rows (it converts every row to Python objects
  and its `group_advantages` is O(groups x rows)); its rows/s there is extrapolated linearly to
  the full table, which flatters it;
- a check that both give identical rows (advantage floats bit for bit) and stats on that subset.

Target: new >= 500k rows/s on 1M rows.

    .venv/bin/python benchmarks/bench_assembly.py [--rows 1000000] [--baseline-rows 100000]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scope_data.assembly import assemble  # noqa: E402
from scope_data.schema import STEP_TYPE, schema_for  # noqa: E402

GROUP = 8
PROMPT_LEN = 32
STATUSES = np.array(["accepted", "truncated", "rejected_wrong", "teacher_error"])


def _lists(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _steps(lengths: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """0-4 steps per response splitting its tokens evenly, PRM scores in [0, 1)."""
    count = rng.integers(0, 5, lengths.size)
    row = np.repeat(np.arange(lengths.size), count)
    k = np.arange(row.size) - np.repeat(np.cumsum(count) - count, count)
    width = lengths[row] // np.maximum(count[row], 1)
    start, end = k * width, (k + 1) * width
    structs = pa.StructArray.from_arrays(
        [pa.array(np.full(row.size, "x = 1")), pa.array(start.astype(np.int32)),
         pa.array(end.astype(np.int32)), pa.array(start.astype(np.int32)),
         pa.array(end.astype(np.int32)), pa.array(rng.random(row.size).astype(np.float32))],
        fields=list(STEP_TYPE))
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), structs)


def make_table(rows: int, corrected: float, seed: int) -> pa.Table:
    """`rows` rows of a plausible corrected table (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_pol = rows  # more than enough: the table is cut at `rows`
    reward = (rng.random(n_pol) < 0.3).astype(np.float32)
    fix = (reward == 0) & (rng.random(n_pol) < corrected)
    # table order: each policy row, then its correction if it has one
    is_fix = np.zeros(n_pol + int(fix.sum()), bool)
    is_fix[np.flatnonzero(fix) + np.arange(1, int(fix.sum()) + 1)] = True
    is_fix = is_fix[:rows]
    src = np.cumsum(~is_fix) - 1  # the policy row a row is, or corrects
    n = is_fix.size
    problem = src // GROUP
    status = np.where(is_fix, STATUSES[rng.choice(4, n, p=[0.7, 0.1, 0.1, 0.1])],
                      np.where(fix[src], "accepted", "not_failed"))
    ok = np.where(is_fix, np.isin(status, ["accepted", "truncated"]), reward[src] > 0)
    length = rng.integers(32, 97, n)
    start = np.where(is_fix, rng.integers(0, 32, n), length).astype(np.int32)
    logprobs = -rng.exponential(1.0, int(length.sum())).astype(np.float32)
    token_row = np.repeat(np.arange(n), length)
    position = np.arange(token_row.size) - np.repeat(np.cumsum(length) - length, length)
    logprobs[is_fix[token_row] & (position >= start[token_row])] = np.nan  # teacher tokens
    ids = np.array([f"{i:016x}" for i in range(n_pol)])
    strings = lambda value: pa.array(np.full(n, value))  # noqa: E731
    cols = {
        "problem_id": pa.array(np.array([f"{p:012x}" for p in range(problem[-1] + 1)])[problem]),
        "source": strings("arith"), "source_index": pa.array(problem.astype(np.int64)),
        "task": strings("arith"), "prompt": strings("Mod 10. Start with 3. Add 4."),
        "answer": strings("7"), "solution": pa.nulls(n, pa.string()),
        "rollout_id": pa.array(np.where(is_fix, np.char.add("fix-", ids[src]), ids[src])),
        "round": pa.array(np.zeros(n, np.int32)),
        "sample_idx": pa.array((src % GROUP).astype(np.int32)), "policy": strings("hf:tiny"),
        "prompt_text": strings("Mod 10. Start with 3. Add 4."),
        "prompt_token_ids": _lists(np.full(n, PROMPT_LEN),
                                   rng.integers(0, 152_000, n * PROMPT_LEN), pa.int32()),
        "response_text": strings("3 + 4 = 7\nAnswer: 7"),
        "response_token_ids": _lists(length, rng.integers(0, 152_000, int(length.sum())),
                                     pa.int32()),
        "behaviour_logprobs": _lists(length, logprobs, pa.float32()),
        "finish_reason": strings("stop"), "temperature": pa.array(np.ones(n, np.float32)),
        "top_p": pa.array(np.ones(n, np.float32)), "seed": pa.array(src.astype(np.int64)),
        "pred_answer": strings("7"), "reward": pa.array(ok.astype(np.float32)),
        "correct": pa.array(ok), "status": strings("ok"), "steps": _steps(length, rng),
        "first_error": pa.array(np.where(ok, -1, 1).astype(np.int32)),
        "prm": strings("rule:arith"), "threshold": pa.array(np.full(n, 0.5, np.float32)),
        "score_status": strings("ok"), "kind": pa.array(np.where(is_fix, "corrected", "policy")),
        "source_rollout_id": pa.array(np.where(is_fix, ids[src], None)),
        "prefix_steps": pa.array(np.where(is_fix, 1, None), pa.int32()),
        "off_policy_start": pa.array(np.where(is_fix, start, None), pa.int32()),
        "teacher": pa.array(np.where(is_fix, "oracle:arith", None)),
        "correct_status": pa.array(status),
    }
    return pa.table(cols, schema=schema_for("corrected"))


def load_baseline(rev: str) -> Callable[..., Any]:
    """`assemble` as it was at git revision `rev` (with that revision's advantages module)."""
    modules = {}
    for name in ("advantages", "assembly"):
        source = subprocess.run(["git", "show", f"{rev}:scope_data/{name}.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        module = types.ModuleType(f"baseline_{name}")
        source = source.replace("from scope_data.advantages import",
                                "from baseline_advantages import")
        sys.modules[module.__name__] = module
        exec(compile(source, f"{rev}:scope_data/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["assembly"].assemble


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Best wall and CPU seconds of `repeat` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeat):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), result


def identical(a: Any, b: Any) -> bool:
    """Same stats, same rows in the same order, floats bit for bit (NaN log-probs included),
    on the columns of `b` (a baseline from before a column was added compares on its own)."""
    if not set(b.rows.columns) <= set(a.rows.columns):
        return False
    rows = a.rows.select(b.rows.columns)
    if a.stats != b.stats or rows.schema != b.rows.schema or rows.height != b.rows.height:
        return False
    for name in b.rows.columns:
        x, y = rows[name], b.rows[name]
        if x.dtype == pl.List(pl.Float32) or x.dtype == pl.Float32:
            x, y = (s.explode() if s.dtype == pl.List(pl.Float32) else s for s in (x, y))
            if x.to_numpy().tobytes() != y.to_numpy().tobytes():
                return False
        elif not x.equals(y, check_names=True):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--baseline-rev", default="454be1b")
    ap.add_argument("--corrected", type=float, default=0.3,
                    help="share of failed rollouts that have a corrected row")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    table = make_table(args.rows, args.corrected, args.seed)
    df = pl.from_arrow(table)
    kinds = dict(df["kind"].value_counts().iter_rows())
    print(f"built {df.height:,} rows ({kinds.get('policy', 0):,} policy, "
          f"{kinds.get('corrected', 0):,} corrected; {table.nbytes / 1e9:.2f} GB in Arrow) in "
          f"{time.perf_counter() - t0:.1f}s")
    baseline = load_baseline(args.baseline_rev)
    sub = df.head(args.baseline_rows)

    new_wall, new_cpu, result = timed(lambda: assemble(df, "scope"), args.repeat)
    sub_wall, sub_cpu, sub_new = timed(lambda: assemble(sub, "scope"), args.repeat)
    old_wall, old_cpu, sub_old = timed(lambda: baseline(sub, "scope"), 1)
    same = identical(sub_new, sub_old)

    rate = df.height / new_wall
    old_rate = sub.height / old_wall
    print("\nwall: best elapsed seconds; CPU: all threads' CPU seconds (steadier on a shared "
          "machine; rows per CPU second is what an idle machine reaches at least)")
    print(f"{'implementation':<44}{'rows':>11}{'wall s':>8}{'CPU s':>8}{'rows/s':>12}"
          f"{'rows/CPU s':>12}")
    for name, rows, wall, cpu in (
        ("new assemble (polars)", df.height, new_wall, new_cpu),
        ("new assemble (polars), subset", sub.height, sub_wall, sub_cpu),
        (f"baseline {args.baseline_rev} (row loop), subset", sub.height, old_wall, old_cpu),
    ):
        print(f"{name:<44}{rows:>11,}{wall:>8.2f}{cpu:>8.2f}{rows / wall:>12,.0f}"
              f"{rows / cpu:>12,.0f}")
    print(f"\nratio new/baseline rows/s: {rate / old_rate:.1f}x wall, "
          f"{(df.height / new_cpu) / (sub.height / old_cpu):.1f}x CPU (baseline measured on "
          f"{sub.height:,} rows, extrapolated linearly to {df.height:,}: "
          f"{df.height / old_rate:.0f}s; a lower bound, its group advantages are quadratic)")
    print(f"same subset, identical rows, advantages and stats: {same}")
    print(f"target >= 500,000 rows/s: {'met' if rate >= 500_000 else 'NOT met'} "
          f"({rate:,.0f} rows/s wall, {df.height / new_cpu:,.0f} rows/CPU s; "
          f"{result.stats['responses']:,} training rows, {result.stats['groups']:,} groups)")
    print(json.dumps({"rows": df.height, "new_s": new_wall, "new_cpu_s": new_cpu,
                      "new_rows_per_s": rate, "baseline_rows": sub.height,
                      "baseline_s": old_wall, "baseline_cpu_s": old_cpu,
                      "baseline_rows_per_s": old_rate, "subset_new_s": sub_wall,
                      "ratio": rate / old_rate, "identical": same}))
    if not same:
        sys.exit("the new and the baseline assembly differ on the subset")


if __name__ == "__main__":
    main()
