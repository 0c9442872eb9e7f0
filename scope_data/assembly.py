"""Group assembly: from the corrected table to one training row per response (DESIGN.md 1.5).

A group is one problem in one round. For algos that use corrections (`scope_data.algos`:
`scope`, `luffy`), each accepted correction (kind ``corrected``) replaces its source rollout
(the ``policy`` row whose rollout_id is its ``source_rollout_id``) in that group; the others
(`grpo`, `prm_dense`) ignore corrections. Advantages are
then computed over the assembled group (`scope_data.advantages`), and groups whose advantages
are all zero are skipped (they give no gradient) and counted.

Order: groups in order of their first row (policy rows first, then groups that only hold
corrections); in a group, its remaining policy rows in table order, then its corrections. A
correction is used once per ``source_rollout_id`` (a later one is a duplicate); one whose source
is not a policy row of its group is an orphan and is added as it is.

Token layout of a training row: ``response_token_ids[:off_policy_start]`` are on-policy (the
policy's own tokens, trained with PPO clip against old log-probs), the rest are off-policy
(teacher tokens, trained with LUFFY's shaped objective). A ``policy`` row has
``off_policy_start = len(response)``. (The selection of which failed rollouts get corrected
lives in `scope_data.groups`, owned by the correct stage.)

DAPO's length handling (both off by default): `soft_punish_cache` > 0 adds the soft overlong
punishment of each member's response length in tokens (`scope_data.advantages`) to its reward
before the advantages (column ``overlong_penalty``; a correction is judged on its whole
response, prefix and teacher suffix); ``truncated`` marks members whose finish_reason is
``length`` (a correction's is the teacher's), which `scope train --mask-truncated-completions`
drops from the loss after they counted in their group's advantages, as TRL does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from scope_data.advantages import (
    dense_step_advantages,
    group_advantages,
    soft_overlong_punishment,
    zero_groups,
)
from scope_data.algos import get_algo
from scope_data.correction import CORRECTED_ROW_STATUSES

GROUP_KEY = ["problem_id", "round"]
HEAVY = ["prompt_token_ids", "response_token_ids", "behaviour_logprobs"]  # gathered once

ROW_SCHEMA = {
    "group_id": pl.String, "problem_id": pl.String, "round": pl.Int32, "rollout_id": pl.String,
    "kind": pl.String, "source_rollout_id": pl.String,
    "prompt_token_ids": pl.List(pl.Int32), "response_token_ids": pl.List(pl.Int32),
    "behaviour_logprobs": pl.List(pl.Float32), "off_policy_start": pl.Int32,
    "reward": pl.Float32, "advantage": pl.Float32, "token_advantages": pl.List(pl.Float32),
    "overlong_penalty": pl.Float32, "truncated": pl.Boolean,
}


@dataclass
class Assembly:
    """Training rows (schema `ROW_SCHEMA`) and counts describing how they were built."""

    rows: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _row_error(row: dict[str, Any], message: str) -> ValueError:
    return ValueError(
        f"corrected table row rollout_id={row.get('rollout_id')!r} "
        f"(problem_id={row.get('problem_id')!r}): {message}"
    )


def _check_row(row: dict[str, Any]) -> None:
    n = len(row["response_token_ids"])
    if row["kind"] not in ("policy", "corrected"):
        raise _row_error(row, f"kind {row['kind']!r} is neither 'policy' nor 'corrected'")
    if len(row["behaviour_logprobs"]) != n:
        raise _row_error(row, f"{len(row['behaviour_logprobs'])} behaviour_logprobs for "
                              f"{n} response tokens")
    if row["kind"] == "corrected":
        start = row["off_policy_start"]
        if start is None:
            raise _row_error(row, "corrected row without off_policy_start (where the teacher "
                                  "suffix begins); the correct stage must set it")
        if not 0 <= start <= n:
            raise _row_error(row, f"off_policy_start {start} outside 0..{n}")
        if row["source_rollout_id"] is None:
            raise _row_error(row, "corrected row without source_rollout_id")
    if not math.isfinite(row["reward"]):
        raise _row_error(row, f"reward {row['reward']} is not finite")


def _validate(df: pl.DataFrame) -> None:
    """Raise `_check_row`'s error for the first malformed row (rows flagged by expressions)."""
    n = pl.col("response_token_ids").list.len()
    start = pl.col("off_policy_start")
    bad = (
        ~pl.col("kind").is_in(["policy", "corrected"])
        | (pl.col("behaviour_logprobs").list.len() != n)
        | ((pl.col("kind") == "corrected")
           & (start.is_null() | (start < 0) | (start > n) | pl.col("source_rollout_id").is_null()))
        | ~pl.col("reward").is_finite()
    ).fill_null(True)
    for row in df.filter(bad).iter_rows(named=True):
        _check_row(row)


def _first_duplicate(frame: pl.DataFrame) -> dict[str, Any] | None:
    """The first row whose (group, rollout_id) an earlier or later row repeats, if any."""
    keys = frame.select("_first", "rollout_id")
    if keys.select(pl.struct(pl.all()).hash().n_unique()).item() == frame.height:
        return None  # distinct hashes, distinct keys: the usual case, without the exact pass
    twice = frame.filter(keys.is_duplicated())
    return twice.sort("_row").row(0, named=True) if twice.height else None


def _check_unique(policy: pl.DataFrame, fixes: pl.DataFrame) -> None:
    """Rollout ids must be unique in a group, and a correction must not correct a correction
    (the replacement rule above assumes both; a correction may reuse its source's id)."""
    renamed = fixes.filter(pl.col("rollout_id") != pl.col("source_rollout_id"))
    for frame in (pl.concat([policy, renamed]), fixes):
        row = _first_duplicate(frame)
        if row is not None:
            raise _row_error(row, "rollout_id appears twice in its group (problem_id, round)")
    chained = renamed.join(fixes, left_on=["_first", "source_rollout_id"],
                           right_on=["_first", "rollout_id"], how="semi")
    if chained.height:
        raise _row_error(chained.row(0, named=True), "source_rollout_id names another corrected "
                                                     "row; corrections replace policy rows")


def _members(light: pl.DataFrame, uses_corrections: bool, accepted_statuses: tuple[str, ...],
             stats: dict[str, int]) -> tuple[pl.DataFrame, int]:
    """The group members in assembled order (columns _row, _first: the group's code, _n and
    the scalars) and the number of groups."""
    policy, corrected = pl.col("kind") == "policy", pl.col("kind") == "corrected"
    accepted = (pl.lit(uses_corrections) & corrected
                & pl.col("correct_status").is_in(accepted_statuses).fill_null(False))
    if not uses_corrections:
        _count(stats, "corrections_ignored_by_algo", light.filter(corrected).height)
    else:
        rejected = light.filter(corrected & ~accepted).group_by("correct_status",
                                                                 maintain_order=True).len()
        for status, count in rejected.iter_rows():
            stats[f"corrections_rejected_{status}"] = count
    # a group sits where its first row is (policy rows before corrections, duplicates included)
    key = pl.when(policy).then(pl.col("_row")).otherwise(pl.col("_row") + light.height)
    light = light.with_columns(_key=key).with_columns(
        _first=pl.when(policy | accepted).then(pl.col("_key")).min().over(GROUP_KEY))
    pol = light.filter(policy)
    _count(stats, "policy_rows", pol.height)
    fixes = light.filter(accepted)
    first = fixes["source_rollout_id"].is_first_distinct()
    _count(stats, "corrections_duplicate_source", fixes.height - int(first.sum()))
    fixes = fixes.filter(first)
    _check_unique(pol, fixes)
    kept = pol.join(fixes.select("_first", rollout_id="source_rollout_id"),
                    on=["_first", "rollout_id"], how="anti")
    _count(stats, "corrections_used", pol.height - kept.height)
    _count(stats, "corrections_orphan", fixes.height - pol.height + kept.height)
    members = pl.concat([kept, fixes]).select(
        "_row", "_first", "_key", "_n", "kind", "off_policy_start", "reward", "truncated")
    return members.sort("_first", "_key"), light["_first"].drop_nulls().n_unique()


def _count(stats: dict[str, int], key: str, value: int) -> None:
    if value:
        stats[key] = value


def assemble(
    table: pa.Table | pl.DataFrame,
    algo: str = "scope",
    estimator: str = "grpo",
    scale_rewards: str | None = None,
    prm_alpha: float = 1.0,
    accepted_statuses: tuple[str, ...] = CORRECTED_ROW_STATUSES,
    keep_zero_groups: bool = False,
    soft_punish_cache: int = 0,
    max_completion_len: int | None = None,
    overlong_penalty_factor: float = 1.0,
) -> Assembly:
    """Assemble groups from a corrected table and attach advantages.

    `accepted_statuses`: ``correct_status`` values of the corrected rows to use (default: every
    corrected row `scope correct` writes, `scope_data.correction.CORRECTED_ROW_STATUSES`).
    `keep_zero_groups`: keep groups whose advantages are all zero (for inspection only).
    `soft_punish_cache` > 0: DAPO's soft overlong punishment with Lmax = `max_completion_len`
    (required then), scaled by `overlong_penalty_factor`, added to the rewards.
    Raises ValueError naming the rollout for malformed rows.
    """
    record = get_algo(algo)
    dense = record.dense_rewards
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    cols = ["problem_id", "round", "rollout_id", "kind", "source_rollout_id", "prompt_token_ids",
            "response_token_ids", "behaviour_logprobs", "off_policy_start", "reward",
            "correct_status", "finish_reason"] + (["steps"] if dense else [])
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"corrected table lacks columns {missing}")
    df = df.select(cols).with_row_index("_row")
    _validate(df)
    light = df.select("_row", *GROUP_KEY, "rollout_id", "kind", "source_rollout_id",
                      "off_policy_start", "reward", "correct_status",
                      _n=pl.col("response_token_ids").list.len().cast(pl.Int64),
                      truncated=(pl.col("finish_reason") == "length").fill_null(False))
    stats: dict[str, int] = {}
    members, n_groups = _members(light, record.uses_corrections, accepted_statuses, stats)
    if members.height == 0:
        return Assembly(pl.DataFrame(schema=ROW_SCHEMA), dict(stats, groups=0, responses=0))

    penalty = pl.lit(0.0, pl.Float64)
    if soft_punish_cache:
        if max_completion_len is None:
            raise ValueError("soft_punish_cache needs max_completion_len")
        penalty = soft_overlong_punishment(pl.col("_n"), max_completion_len, soft_punish_cache,
                                           overlong_penalty_factor)
    members = members.with_columns(overlong_penalty=penalty)
    codes = members["_first"].to_numpy()
    shaped = members.select(pl.col("reward").cast(pl.Float64) + pl.col("overlong_penalty"))
    adv = group_advantages(shaped.to_series().to_numpy(), codes, estimator, scale_rewards)
    token_adv = pl.lit(None, ROW_SCHEMA["token_advantages"])
    if dense:
        spans = (df.select(pl.col("steps").gather(members["_row"])).with_row_index("row")
                 .explode("steps").unnest("steps"))
        token_adv = dense_step_advantages(adv, codes, spans, members["_n"].to_numpy(), prm_alpha)
    dead = zero_groups(token_adv if dense else adv, members["_first"])
    members = members.with_columns(advantage=pl.Series(adv), token_advantages=token_adv)
    if not keep_zero_groups:
        dead_codes = pl.Series(list(dead), dtype=members["_first"].dtype)
        members = members.filter(~pl.col("_first").is_in(dead_codes.implode()))
    _count(stats, "empty_responses", int((members["_n"] == 0).sum()))
    out = members.filter(pl.col("_n") > 0).with_columns(
        off_policy_start=pl.when(pl.col("kind") == "policy").then(pl.col("_n"))
        .otherwise(pl.col("off_policy_start")))
    _count(stats, "responses_overlong_penalised", int((out["overlong_penalty"] < 0).sum()))
    _count(stats, "responses_truncated", int(out["truncated"].sum()))
    if out.height:
        on_policy = int(out["off_policy_start"].sum())
        stats.update(on_policy_tokens=on_policy,
                     off_policy_tokens=int(out["_n"].sum()) - on_policy)
    stats.update(groups=n_groups, groups_zero_advantage=len(dead),
                 groups_trained=out["_first"].n_unique(), responses=out.height)
    rows = df.select(*GROUP_KEY, "rollout_id", "kind", "source_rollout_id", "reward", *HEAVY)
    rows = rows[out["_row"]].hstack(out.select("off_policy_start", "advantage",
                                               "token_advantages", "overlong_penalty",
                                               "truncated"))
    rows = rows.with_columns(
        group_id=pl.concat_str("problem_id", pl.lit(":"), pl.col("round").cast(pl.String)))
    return Assembly(rows.select(list(ROW_SCHEMA)).cast(ROW_SCHEMA), stats)
