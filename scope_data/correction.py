"""Splicing a teacher suffix onto the policy's kept prefix (DESIGN.md section 1, step 4).

A failed rollout with first error k* keeps the policy's OWN sampled tokens for steps
0..k*-1, exactly as sampled::

    prefix_ids = response_token_ids[: steps[k*].token_start]

(never re-tokenised from text: re-encoding decoded text can give other ids, and the trainer
needs the ids whose behaviour log-probs were recorded). The teacher continues from there and
returns TEXT, because its tokenizer may differ from the policy's; the suffix is re-encoded with
the POLICY tokenizer::

    response_token_ids = prefix_ids + encode_policy(suffix_text)      off_policy_start = |prefix|
    response_text      = decode_policy(prefix_ids) + suffix_text
    behaviour_logprobs = prefix_logprobs + [NaN] * |suffix ids|

Suffix tokens get NaN behaviour log-probs: they were not sampled by the policy, and the trainer
treats tokens at or after ``off_policy_start`` as off-policy (LUFFY policy shaping takes the
behaviour probability as 1) and never reads their behaviour log-probs. A suffix that does not
fit ``max_response_tokens`` is cut and the splice gets status ``truncated``.

Pure logic: tokenizers enter as ``encode``/``decode`` callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from scope_data.schema import CORRECTED_FIELDS, SCHEMAS

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


class CorrectionError(ValueError):
    """A scored row whose step offsets cannot be spliced (names the rollout)."""


# `correct_status` of a correction the teacher wrote (its source rollout gets the same status)
ACCEPTED = "accepted"  # the corrected answer verifies
TRUNCATED = "truncated"  # it verifies, but the suffix was cut to fit the length limit
REJECTED_WRONG = "rejected_wrong"  # the corrected answer is still wrong
VERIFIED_STATUSES = (ACCEPTED, TRUNCATED)  # corrections that salvage their rollout
# the `kind="corrected"` rows `scope correct` writes: verified ones, plus wrong ones when the
# user turns require_correct off (`--no-require-correct`: they asked to train on them)
CORRECTED_ROW_STATUSES = (*VERIFIED_STATUSES, REJECTED_WRONG)
# the kept tokens do not decode to the response before step k*: the row is kept, not corrected
PREFIX_MISMATCH = "prefix_mismatch"
SALVAGE_RATE = "verified corrections / failed rollouts"


def outcome_status(verified: bool, truncated: bool) -> str:
    """The `correct_status` of a spliced correction."""
    if not verified:
        return REJECTED_WRONG
    return TRUNCATED if truncated else ACCEPTED


def salvage_rate(verified_corrections: int, failed_rollouts: int) -> float | None:
    """The salvage rate (`SALVAGE_RATE`); None when no rollout failed."""
    return verified_corrections / failed_rollouts if failed_rollouts else None


@dataclass(frozen=True)
class Splice:
    """A corrected response: the kept policy prefix followed by the teacher suffix."""

    response_token_ids: list[int]
    response_text: str
    behaviour_logprobs: list[float]
    off_policy_start: int  # == len(prefix ids); tokens from here on are off-policy
    status: str  # "ok" | "truncated"


def check_step_offsets(
    rollout_id: str,
    steps: Sequence[Mapping[str, Any]],
    num_tokens: int,
    num_logprobs: int | None = None,
) -> None:
    """Raise CorrectionError unless the step token spans fit the response ids.

    Spans must satisfy ``0 <= token_start <= token_end <= num_tokens``, be ordered and
    non-overlapping; ``behaviour_logprobs`` (when given) has one value per response token.
    """
    if num_logprobs is not None and num_logprobs != num_tokens:
        raise CorrectionError(
            f"rollout {rollout_id}: {num_logprobs} behaviour_logprobs for {num_tokens} "
            "response_token_ids"
        )
    previous_end = 0
    for k, step in enumerate(steps):
        start, end = step.get("token_start"), step.get("token_end")
        if start is None or end is None:
            raise CorrectionError(f"rollout {rollout_id}: step {k} has no token offsets")
        if not 0 <= start <= end <= num_tokens:
            raise CorrectionError(
                f"rollout {rollout_id}: step {k} token span [{start}, {end}) does not fit its "
                f"{num_tokens} response_token_ids (scored table does not match the rollouts)"
            )
        if start < previous_end:
            raise CorrectionError(
                f"rollout {rollout_id}: step {k} starts at token {start}, before step {k - 1} "
                f"ends ({previous_end}); step token spans must be ordered"
            )
        previous_end = end


def check_table_offsets(rows: pl.DataFrame) -> None:
    """`check_step_offsets` for every row with steps of a scored frame (columns rollout_id,
    steps, response_token_ids, behaviour_logprobs): raises its error for the first bad row."""
    n = pl.col("response_token_ids").list.len()
    has_steps = (pl.col("steps").list.len() > 0).fill_null(False)
    step = pl.col("steps")
    spans = (
        rows.select(_i=pl.int_range(pl.len()), _n=n, steps=step).filter(has_steps)
        .explode("steps")
        .select("_i", "_n", start=step.struct.field("token_start"),
                end=step.struct.field("token_end"))
    )
    start, end = pl.col("start"), pl.col("end")
    bad_span = (start.is_null() | end.is_null() | (start < 0) | (start > end)
                | (end > pl.col("_n")) | (start < end.shift(1, fill_value=0).over("_i")))
    bad = spans.filter(bad_span.fill_null(True))["_i"]
    flagged = rows.with_row_index("_i").filter(
        has_steps & ((pl.col("behaviour_logprobs").list.len() != n).fill_null(True)
                     | pl.col("_i").is_in(bad.cast(pl.UInt32).implode())))
    for row in flagged.iter_rows(named=True):
        check_step_offsets(row["rollout_id"], row["steps"], len(row["response_token_ids"]),
                           len(row["behaviour_logprobs"]))


def corrected_table(rows: pa.Table, status: pl.Series,
                    written: list[tuple[int, dict[str, Any]]]) -> pa.Table:
    """The corrected table of a scored shard: every input row as a ``kind="policy"`` row with
    its `status` (``correct_status``), and each written correction (a corrected-table row
    dict) right after the input row at its position."""
    schema = SCHEMAS["corrected"]
    n = rows.num_rows
    filled = {f.name: pa.nulls(n, f.type) for f in CORRECTED_FIELDS}
    filled.update(kind=pa.repeat("policy", n), correct_status=status.to_arrow())
    policy = pa.Table.from_arrays(
        [filled[f.name] if f.name in filled else rows.column(f.name) for f in schema],
        names=schema.names).cast(schema)
    if not written:
        return policy.combine_chunks()
    fixed = pa.Table.from_pylist([row for _, row in written], schema=schema)
    at = np.array([i for i, _ in written])
    order = np.argsort(np.concatenate([2 * np.arange(n), 2 * at + 1]))
    return pa.concat_tables([policy, fixed]).take(order).combine_chunks()


def prefix_bounds(steps: Sequence[Mapping[str, Any]], k: int) -> tuple[int, int]:
    """(response tokens, response chars) kept when step k is the first error: everything before
    step k. ``k == len(steps)`` (an unfinished response whose every step is right: the first
    missing step is the error) keeps every step."""
    if k < len(steps):
        return int(steps[k]["token_start"]), int(steps[k]["char_start"])
    return int(steps[-1]["token_end"]), int(steps[-1]["char_end"])


def kept_prefix(
    rollout_id: str, steps: Sequence[Mapping[str, Any]], k: int, response_ids: Sequence[int],
    response_text: str, decode: Decode,
) -> tuple[list[int], str]:
    """The policy's own token ids kept before step k, and their decoded text.

    They are the ids before step k's first token. A token merged across the step boundary
    (one token for ``"8\\n8"``: the end of step k-1 and the start of step k) would carry step
    k's text into the prefix, so the prefix is cut before that token: the kept tokens end at or
    before step k's start, and the teacher continues from inside step k-1. With a tokenizer whose
    decode reproduces the response, the kept text must be the response up to step k (give or
    take whitespace) or up to that cut; else CorrectionError names the rollout (the scored
    table's token offsets do not match ``response_token_ids``).
    """
    end, chars = prefix_bounds(steps, k)
    ids = [int(t) for t in response_ids[:end]]
    text = decode(ids)
    if decode(list(response_ids)) != response_text:
        return ids, text  # a lossy decode: there is nothing exact to check against

    def inside(t: str) -> bool:
        return response_text.startswith(t) and len(t) <= chars

    if inside(text) and not response_text[len(text) : chars].strip():
        return ids, text
    if ids and not inside(text) and inside(cut := decode(ids[:-1])):
        return ids[:-1], cut
    raise CorrectionError(
        f"rollout {rollout_id}: the tokens before step {k} decode to {text[-40:]!r}, which is "
        f"not the response text before char {chars} "
        f"({response_text[max(0, chars - 40) : chars]!r}); the scored table's token offsets "
        "do not match response_token_ids"
    )


def splice(
    prefix_ids: Sequence[int],
    prefix_logprobs: Sequence[float],
    suffix_text: str,
    encode: Encode,
    decode: Decode,
    *,
    max_response_tokens: int | None = None,
    eos_token_id: int | None = None,
) -> Splice:
    """Prefix ids + ``encode(suffix_text)`` (+ ``eos_token_id`` if given), cut to fit.

    The prefix itself is never cut (it is at most the original response); when the suffix
    (and EOS) would pass ``max_response_tokens`` the suffix ids are cut, no EOS is appended,
    the text becomes ``decode(prefix) + decode(kept suffix ids)`` and the status is
    ``truncated``.
    """
    if len(prefix_logprobs) != len(prefix_ids):
        raise ValueError(f"{len(prefix_logprobs)} log-probs for {len(prefix_ids)} prefix ids")
    prefix = [int(t) for t in prefix_ids]
    suffix = [int(t) for t in encode(suffix_text)] if suffix_text else []
    tail = [] if eos_token_id is None else [int(eos_token_id)]
    status = "ok"
    if max_response_tokens is not None and len(prefix) + len(suffix) + len(tail) > max(
        max_response_tokens, len(prefix)
    ):
        room = max(0, max_response_tokens - len(prefix))
        suffix, tail, status = suffix[:room], [], "truncated"
        suffix_text = decode(suffix) if suffix else ""
    ids = prefix + suffix + tail
    logprobs = [float(x) for x in prefix_logprobs] + [math.nan] * (len(suffix) + len(tail))
    return Splice(ids, decode(prefix) + suffix_text, logprobs, len(prefix), status)
