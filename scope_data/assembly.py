"""Group assembly: from the corrected table to one training row per response (DESIGN.md 1.5).

A group is one problem in one round. For algos that use corrections (`scope_data.algos`:
`scope`, `luffy`), each accepted correction (kind ``corrected``) replaces its source rollout
(the ``policy`` row whose rollout_id is its ``source_rollout_id``) in that group; the others
(`grpo`, `prm_dense`) ignore corrections. Advantages are
then computed over the assembled group (`scope_data.advantages`), and groups whose advantages
are all zero are skipped (they give no gradient) and counted.

Token layout of a training row: ``response_token_ids[:off_policy_start]`` are on-policy (the
policy's own tokens, trained with PPO clip against old log-probs), the rest are off-policy
(teacher tokens, trained with LUFFY's shaped objective). A ``policy`` row has
``off_policy_start = len(response)``. (The selection of which failed rollouts get corrected
lives in `scope_data.groups`, owned by the correct stage.)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from scope_data.advantages import dense_step_advantages, group_advantages, zero_groups
from scope_data.algos import get_algo
from scope_data.correction import CORRECTED_ROW_STATUSES

ROW_SCHEMA = {
    "group_id": pl.String, "problem_id": pl.String, "round": pl.Int32, "rollout_id": pl.String,
    "kind": pl.String, "source_rollout_id": pl.String,
    "prompt_token_ids": pl.List(pl.Int32), "response_token_ids": pl.List(pl.Int32),
    "behaviour_logprobs": pl.List(pl.Float32), "off_policy_start": pl.Int32,
    "reward": pl.Float32, "advantage": pl.Float32, "token_advantages": pl.List(pl.Float32),
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


def assemble(
    table: pa.Table | pl.DataFrame,
    algo: str = "scope",
    estimator: str = "grpo",
    scale_rewards: str | None = None,
    prm_alpha: float = 1.0,
    accepted_statuses: tuple[str, ...] = CORRECTED_ROW_STATUSES,
    keep_zero_groups: bool = False,
) -> Assembly:
    """Assemble groups from a corrected table and attach advantages.

    `accepted_statuses`: ``correct_status`` values of the corrected rows to use (default: every
    corrected row `scope correct` writes, `scope_data.correction.CORRECTED_ROW_STATUSES`).
    `keep_zero_groups`: keep groups whose advantages are all zero (for inspection only).
    Raises ValueError naming the rollout for malformed rows.
    """
    record = get_algo(algo)
    dense = record.dense_rewards
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    cols = ["problem_id", "round", "rollout_id", "kind", "source_rollout_id", "prompt_token_ids",
            "response_token_ids", "behaviour_logprobs", "off_policy_start", "reward",
            "correct_status"] + (["steps"] if dense else [])
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"corrected table lacks columns {missing}")
    stats: Counter[str] = Counter()
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    corrections: list[dict[str, Any]] = []
    for row in df.select(cols).iter_rows(named=True):
        _check_row(row)
        if not math.isfinite(row["reward"]):
            raise _row_error(row, f"reward {row['reward']} is not finite")
        key = (row["problem_id"], row["round"])
        if row["kind"] == "policy":
            groups.setdefault(key, {})[row["rollout_id"]] = row
            stats["policy_rows"] += 1
        elif not record.uses_corrections:
            stats["corrections_ignored_by_algo"] += 1
        elif row["correct_status"] not in accepted_statuses:
            stats[f"corrections_rejected_{row['correct_status']}"] += 1
        else:
            corrections.append(row)
    replaced: set[str] = set()
    for row in corrections:
        group = groups.setdefault((row["problem_id"], row["round"]), {})
        source = row["source_rollout_id"]
        if source in replaced:
            stats["corrections_duplicate_source"] += 1
            continue
        if source in group:
            del group[source]
            stats["corrections_used"] += 1
        else:
            stats["corrections_orphan"] += 1  # source not in the table: added to the group
        replaced.add(source)
        group[row["rollout_id"]] = row

    members = [(f"{pid}:{rnd}", r) for (pid, rnd), g in groups.items() for r in g.values()]
    if not members:
        return Assembly(pl.DataFrame(schema=ROW_SCHEMA), dict(stats, groups=0, responses=0))
    gids = [g for g, _ in members]
    adv = group_advantages([r["reward"] for _, r in members], gids, estimator, scale_rewards)
    token_adv: list[Any] = [None] * len(members)
    if dense:
        spans = [[(s["token_start"], s["token_end"], s["score"]) for s in (r["steps"] or [])
                  if s["token_start"] is not None and s["score"] is not None]
                 for _, r in members]
        token_adv = dense_step_advantages(
            adv, gids, spans, [len(r["response_token_ids"]) for _, r in members], prm_alpha)
    dead = zero_groups(token_adv if dense else adv, gids)
    out = []
    for i, (gid, r) in enumerate(members):
        if gid in dead and not keep_zero_groups:
            continue
        n = len(r["response_token_ids"])
        if n == 0:
            stats["empty_responses"] += 1
            continue
        start = n if r["kind"] == "policy" else r["off_policy_start"]
        stats["on_policy_tokens"] += start
        stats["off_policy_tokens"] += n - start
        out.append({
            "group_id": gid, "problem_id": r["problem_id"], "round": r["round"],
            "rollout_id": r["rollout_id"], "kind": r["kind"],
            "source_rollout_id": r["source_rollout_id"],
            "prompt_token_ids": r["prompt_token_ids"],
            "response_token_ids": r["response_token_ids"],
            "behaviour_logprobs": r["behaviour_logprobs"], "off_policy_start": start,
            "reward": r["reward"], "advantage": float(adv[i]),
            "token_advantages": None if token_adv[i] is None else token_adv[i].tolist(),
        })
    stats.update(groups=len(groups), groups_zero_advantage=len(dead),
                 groups_trained=len({r["group_id"] for r in out}), responses=len(out))
    return Assembly(pl.DataFrame(out, schema=ROW_SCHEMA), dict(stats))
