"""Groups of G responses per problem: which failed rollouts get corrected (`scope correct`).

Pure logic over polars frames; no model code. Group ASSEMBLY for training (corrections
replacing their sources, advantages) lives in `scope_data.assembly`.
"""

from __future__ import annotations

import polars as pl

from scope_data.algos import CORRECTION_MODES

# =============================================================================================
# Selection (used by `scope correct`): which failed rollouts a teacher is asked to correct.
# =============================================================================================

# Selection outcome of one rollout; "selected" rows are then corrected by the teacher and get
# the correction's outcome (accepted, rejected_wrong, teacher_error, ...) instead.
NOT_FAILED = "not_failed"  # the verifier says the response is correct: nothing to salvage
NOT_SCORED = "not_scored"  # first_error undetermined (null) or not scored (scope mode only)
PRM_DISAGREES = "prm_disagrees"  # wrong answer, but the PRM found no step below threshold
OUT_OF_RANGE = "first_error_out_of_range"  # k* > number of steps (k* == it: keep every step)
NO_PREFIX = "no_prefix"  # k* == 0: the first step is already wrong, no good prefix to keep
PREFIX_TOO_SHORT = "prefix_too_short"  # 0 < k* < min_prefix_steps
OVER_GROUP_LIMIT = "over_group_limit"  # eligible, but M others in the group ranked higher
GROUP_HAS_CORRECT = "group_has_correct"  # only_all_failed: another response already verifies
SELECTED = "selected"

# score statuses whose (non-null) first_error is trusted: `truncated` (tail steps past the PRM
# context unscored) and `nan` (a NaN score after the located error) still locate it.
SCORED_STATUSES = ("ok", "truncated", "nan")

SELECTION_COLUMNS = ("problem_id", "rollout_id", "sample_idx", "correct", "score_status",
                     "first_error", "steps")


def select_corrections(
    rollouts: pl.DataFrame,
    *,
    mode: str = "scope",
    min_prefix_steps: int = 1,
    max_corrections_per_group: int = 1,
    only_all_failed: bool = False,
) -> pl.DataFrame:
    """One row per input rollout (input order): ``rollout_id``, ``selection`` (a status above)
    and ``prefix_steps`` (steps kept before the teacher takes over; null unless selected).

    ``scope``: a failed rollout is eligible when it was scored (``score_status`` in
    ``SCORED_STATUSES``, ``first_error`` not null), the PRM located a first error
    ``0 <= k* <= len(steps)`` (``len(steps)``: every step right but no answer; the first
    missing step is the error) and ``k* >= min_prefix_steps``; per problem the
    ``max_corrections_per_group`` eligible rollouts with the LATEST first error are
    selected (ties: more kept tokens, then lower ``sample_idx``). ``luffy``: every failed
    rollout is eligible with an empty prefix (the teacher solves from scratch; scores are
    ignored); per problem the first M by ``sample_idx`` are selected.

    ``only_all_failed`` (AMPO's rule) corrects only groups where no response verifies: a group
    with a correct response already has a learning signal, and replacing its failures can turn
    it all-correct (zero advantage), losing their negative signal.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown correction mode {mode!r}; valid: {', '.join(CORRECTION_MODES)}")
    if min_prefix_steps < 0:
        raise ValueError(f"min_prefix_steps must be >= 0, got {min_prefix_steps}")
    if max_corrections_per_group < 1:
        raise ValueError(f"max_corrections_per_group must be >= 1, got {max_corrections_per_group}")
    missing = [c for c in SELECTION_COLUMNS if c not in rollouts.columns]
    if missing:
        raise ValueError(f"select_corrections: missing columns {missing}")

    df = rollouts.select(SELECTION_COLUMNS).with_row_index("_order")
    k = pl.col("first_error")
    n_steps = pl.col("steps").list.len()
    if mode == "luffy":
        status = pl.when(pl.col("correct")).then(pl.lit(NOT_FAILED)).otherwise(pl.lit(SELECTED))
        prefix = pl.lit(0, dtype=pl.Int32)
        rank_keys, descending = ["sample_idx"], [False]
    else:
        status = (
            pl.when(pl.col("correct")).then(pl.lit(NOT_FAILED))
            .when(~pl.col("score_status").is_in(SCORED_STATUSES) | k.is_null())
            .then(pl.lit(NOT_SCORED))
            .when(k < 0).then(pl.lit(PRM_DISAGREES))
            .when(k > n_steps).then(pl.lit(OUT_OF_RANGE))
            .when(k < min_prefix_steps).then(
                pl.when(k == 0).then(pl.lit(NO_PREFIX)).otherwise(pl.lit(PREFIX_TOO_SHORT))
            )
            .otherwise(pl.lit(SELECTED))
        )
        prefix = k.cast(pl.Int32)
        # tokens kept = token_start of step k*, or every step's tokens when k* = len(steps)
        # (only read for eligible rows, where k* is valid)
        kept = pl.coalesce(
            pl.col("steps").list.get(k.clip(0, None).cast(pl.Int64), null_on_oob=True)
            .struct.field("token_start"),
            pl.col("steps").list.last().struct.field("token_end"))
        df = df.with_columns(_kept=kept)
        rank_keys, descending = ["first_error", "_kept", "sample_idx"], [True, True, False]
    if only_all_failed:
        status = (pl.when((status == SELECTED) & pl.col("correct").any().over("problem_id"))
                  .then(pl.lit(GROUP_HAS_CORRECT)).otherwise(status))
    df = df.with_columns(selection=status, _prefix=prefix)
    eligible = df.filter(pl.col("selection") == SELECTED).sort(
        [*rank_keys, "_order"], descending=[*descending, False]
    )
    eligible = eligible.with_columns(_rank=pl.int_range(pl.len()).over("problem_id"))
    over = eligible.filter(pl.col("_rank") >= max_corrections_per_group)["_order"]
    df = df.with_columns(
        selection=pl.when(pl.col("_order").is_in(over.implode()))
        .then(pl.lit(OVER_GROUP_LIMIT)).otherwise(pl.col("selection"))
    )
    return df.sort("_order").select(
        "rollout_id",
        "selection",
        prefix_steps=pl.when(pl.col("selection") == SELECTED).then(pl.col("_prefix")),
    )


def rescue_counts(table: pl.DataFrame) -> dict[str, int]:
    """Groups (problems) whose policy responses are all wrong, and how many of those now hold
    a correct ``corrected`` row ("rescued": the group gives a learning signal again).

    ``table`` is a corrected table (columns problem_id, kind, correct).
    """
    per_group = table.group_by("problem_id").agg(
        policy_ok=(pl.col("correct") & (pl.col("kind") == "policy")).any(),
        corrected_ok=(pl.col("correct") & (pl.col("kind") == "corrected")).any(),
    )
    all_failed = per_group.filter(~pl.col("policy_ok"))
    return {
        "groups": per_group.height,
        "groups_all_failed": all_failed.height,
        "groups_rescued": all_failed.filter(pl.col("corrected_ok")).height,
    }

