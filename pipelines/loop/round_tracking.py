"""A round's metrics into the run's tracker (`pipelines.training.tracking.Tracker`).

After each round `scope run` logs the round's rows of RUN_DIR/metrics.parquet into the tracker
run the trainers of every round log their steps into (RUN_DIR/tracking):

    eval/<eval set>/<metric>   every numeric figure of the evaluation (accuracy, pass@k,
                               diversity, response length, ...)
    round/<figure>             every numeric training figure of the round (salvage rate,
                               off-policy share, clip fraction, zero-advantage groups, teacher
                               and PRM tokens, optimizer steps, ...) and round/round = r
    round/first_error          histogram: failed rollouts per first wrong step (exact checker)
    round/prm_first_error      histogram: failed rollouts per PRM-located first error step
                               (the scored table's `first_error`; algos that use the PRM)

The step is the run's optimizer step at the end of round r (optimizer steps of rounds 1..r), so
round figures line up with the Trainer's per-step logs when the trainer's global step continues
across rounds; round 0 (the initial policy) is step 0. A round is logged once (the tracker's
state file records it), so `scope run --resume` does not log it twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

BASE_COLUMNS = ("run_name", "algo", "seed", "round", "eval_set")
HISTOGRAMS = {"first_error_hist": "round/first_error"}


def round_step(metrics: pl.DataFrame, r: int) -> int:
    """Optimizer steps of rounds 1..r (one value per round: every eval row repeats it)."""
    if "train_steps" not in metrics.columns:
        return 0
    per_round = metrics.filter(pl.col("round") <= r).unique("round")
    return int(per_round["train_steps"].fill_null(0).sum())


def round_values(metrics: pl.DataFrame, r: int, rd: Path) -> dict[str, Any]:
    """The tagged figures of round r (see the module docstring); non-numbers are left out."""
    from pipelines.stages.evaluate import read_metrics

    rows = metrics.filter(pl.col("round") == r).to_dicts()
    values: dict[str, Any] = {"round/round": r}
    eval_keys: set[str] = set()
    for row in rows:
        if row["eval_set"] is None:  # a round without evaluation
            continue
        keys = set(read_metrics(str(rd / "eval" / row["eval_set"]))) - {"config"}
        eval_keys |= keys
        values.update({f"eval/{row['eval_set']}/{k}": row[k] for k in sorted(keys) if k in row})
    if rows:
        skip = set(BASE_COLUMNS) | eval_keys | set(HISTOGRAMS)
        values.update({f"round/{k}": v for k, v in rows[0].items() if k not in skip})
    return values


def prm_first_errors(rd: Path, size: int = 10) -> list[int] | None:
    """Failed scored rollouts per PRM first-error step (last bin: index >= size - 1)."""
    from scope_data.shards import is_table, scan

    if not is_table(str(rd / "score")):
        return None
    located = (scan(str(rd / "score"), check=False).select("correct", "first_error")
               .filter(~pl.col("correct") & (pl.col("first_error") >= 0))
               .select(pl.col("first_error").clip(upper_bound=size - 1)).collect())
    counts = dict(located.group_by("first_error").len().iter_rows())
    return [int(counts.get(k, 0)) for k in range(size)]


def log_round(tracker: Any, metrics: pl.DataFrame, r: int, rd: Path) -> None:
    """Log round r's figures and histograms once into `tracker`'s run."""
    key = f"round-{r:04d}"
    if not tracker.active or tracker.logged(key):
        return
    step = round_step(metrics, r)
    rows = metrics.filter(pl.col("round") == r)
    with tracker:
        tracker.log(round_values(metrics, r, rd), step)
        for column, tag in HISTOGRAMS.items():
            if column in rows.columns and rows.height and rows[column][0] is not None:
                tracker.histogram(tag, rows[column][0].to_list(), step)
        prm = prm_first_errors(rd)
        if prm:
            tracker.histogram("round/prm_first_error", prm, step)
    tracker.mark(key)
