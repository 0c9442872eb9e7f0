"""DAPO's dynamic sampling (verl's `algorithm.filter_groups`): which groups a round trains on.

A round with dynamic sampling generates its problems in sampling batches of prompts_per_round
problems each (batch 1, 2, ... of the seeded epoch order, continuing where the previous round
stopped), runs each batch through the algo's stages up to the table it trains from, and stops
once `target` groups with non-zero advantage are in hand or `max_num_gen_batches` batches
were drawn. A group has non-zero advantage when the trainer's own assembly of that table
(`scope_data.assembly.assemble`, with the round's train options) keeps it: its members'
rewards (plus any overlong punishment) are not all equal. For `scope` and `luffy` that is
judged after correction: an all-failed group with an accepted correction is exactly what
they salvage, so it is kept; for `grpo` and `prm_dense` on the rollouts/scored table (for
`prm_dense` the dense step terms count too).

Selection: groups in generation order (batch, then the order of the batch's table), the
first `target` non-zero ones, a problem at most once per round (a later batch that draws a
problem again, past an epoch end, does not add it twice). Non-zero groups beyond the target
stay in their batch's tables, unused. Every generated rollout counts in the round's budget.
"""

from __future__ import annotations

from typing import Any

import polars as pl

GROUP_COLUMNS = ("batch", "problem_id", "nonzero")


def filter_groups(groups: pl.DataFrame, target: int) -> pl.DataFrame:
    """`groups` (one row per (batch, problem_id) in generation order, bool `nonzero`) with a
    bool `selected` column: the rule of the module docstring."""
    missing = [c for c in GROUP_COLUMNS if c not in groups.columns]
    if missing:
        raise ValueError(f"groups frame lacks columns {missing}")
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    i = pl.col("_i")
    first_nonzero = pl.when(pl.col("nonzero")).then(i).min().over("problem_id")
    candidate = (pl.col("nonzero") & (i == first_nonzero)).fill_null(False)
    return (groups.with_row_index("_i").with_columns(_c=candidate)
            .with_columns(selected=pl.col("_c") & (pl.col("_c").cum_sum() <= target))
            .drop("_i", "_c"))


def sampling_done(groups: pl.DataFrame, target: int, max_num_gen_batches: int) -> bool:
    """Whether a round stops drawing batches: `target` groups selected, or the cap reached
    (batches counted from `groups`' distinct `batch` values)."""
    batches = groups["batch"].n_unique() if groups.height else 0
    if batches >= max_num_gen_batches:
        return True
    return int(filter_groups(groups, target)["selected"].sum()) >= target


def sampling_stats(groups: pl.DataFrame, target: int) -> dict[str, Any]:
    """Counts of a round's sampling (manifest stats of its selected table): batches drawn,
    groups generated / with non-zero advantage / selected, and how many the target lacks.
    Optional columns `rollouts` and `tokens` (per group) add the generation budget."""
    sel = filter_groups(groups, target)
    out: dict[str, Any] = {
        "target_groups": target, "sampling_batches": sel["batch"].n_unique(),
        "groups_generated": sel.height, "groups_nonzero": int(sel["nonzero"].sum()),
        "groups_selected": int(sel["selected"].sum()),
    }
    out["groups_short"] = target - out["groups_selected"]
    for col, key in (("rollouts", "rollouts"), ("tokens", "generated_tokens")):
        if col in sel.columns:
            out[key] = int(sel[col].sum())
    return out
