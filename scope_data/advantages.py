"""Group-relative advantages (DESIGN.md section 1, step 6). numpy and polars, no torch.

For a group g of responses to one problem with rewards r_1..r_G:

    grpo     A_i = (r_i - mean_g r) / (std + eps)     std: see `scale_rewards`
    dr_grpo  A_i =  r_i - mean_g r                   (LUFFY's released setting, no std)

`scale_rewards` follows TRL's `GRPOConfig.scale_rewards`: ``group`` divides by the group's
std, ``batch`` by the std of all rewards in the batch, ``none`` does not divide. Stds are
unbiased (ddof=1, like `torch.std`) and a one-member group has std 0; eps = 1e-4 as in TRL.
``dr_grpo`` is shorthand for ``grpo`` with ``scale_rewards="none"``.

`prm_dense` (the naive dense-PRM baseline the SCOPE abstract says fails) adds a per-token
shaping term on top of the sequence advantage, centred per group:

    A_{i,t} = A_i + alpha * (s_{i,k} - c_g)     for tokens t of step k of response i,
    c_g     = mean of all step scores s_{j,k} of the scored responses j in group g,

tokens outside every step (and responses without step scores, e.g. unscored correct ones)
keep A_i. Centring makes the term group-relative like A_i itself, so a group whose responses
all failed still gives a gradient when its PRM scores differ.

DAPO's soft overlong punishment (`soft_overlong_punishment`) is a reward term added to r_i
before the advantages, from the response length L_i in tokens (TRL's
`get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`):

    R(L) = 0                          L <= Lmax - Lcache
           (Lmax - Lcache - L) / Lcache   Lmax - Lcache < L <= Lmax
           -1                         L > Lmax

Everything is vectorised over groups. Group means and stds are numpy reductions over a
(groups, size) block per group size, i.e. numpy's pairwise summation of each group's values in
row order: the same floats as `np.mean` / `np.std` of each group alone (polars' own float sums
use another order and may differ in the last bit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

ESTIMATORS = ("grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
EPS = 1e-4

GroupIds = Sequence[object] | np.ndarray | pl.Series


def resolve_scale_rewards(estimator: str, scale_rewards: str | None) -> str:
    """The effective `scale_rewards` for an estimator; conflicting choices raise ValueError."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {ESTIMATORS}")
    if scale_rewards is not None and scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; use one of {SCALE_REWARDS}")
    if estimator == "dr_grpo":
        if scale_rewards not in (None, "none"):
            raise ValueError(
                f"advantage estimator 'dr_grpo' means scale_rewards='none', got {scale_rewards!r}"
            )
        return "none"
    return scale_rewards or "group"


def _series(group_ids: GroupIds) -> pl.Series:
    return group_ids if isinstance(group_ids, pl.Series) else pl.Series(np.asarray(group_ids))


def _codes(group_ids: GroupIds) -> np.ndarray:
    """Dense int64 codes 0..G-1 of group ids: equal ids get equal codes."""
    return _series(group_ids).rank("dense").to_numpy().astype(np.int64) - 1


def _group_blocks(values: np.ndarray, codes: np.ndarray
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per group size n: (rows, values[rows]), rows[j] = the positions of one group of n."""
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.diff(codes[order], prepend=-1))
    sizes = np.diff(np.append(starts, codes.size))
    for n in np.unique(sizes):
        rows = order[starts[sizes == n][:, None] + np.arange(n)]
        yield rows, values[rows]


def _std(x: np.ndarray) -> np.ndarray | float:
    """Unbiased std along the last axis (kept as a length-1 axis); 0 for one value."""
    return np.std(x, axis=-1, ddof=1, keepdims=True) if x.shape[-1] > 1 else 0.0


def group_advantages(
    rewards: Sequence[float] | np.ndarray,
    group_ids: GroupIds,
    estimator: str = "grpo",
    scale_rewards: str | None = None,
    eps: float = EPS,
) -> np.ndarray:
    """Per-response advantages (float64), groups given by equal `group_ids`."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or len(group_ids) != r.size:
        raise ValueError("rewards and group_ids must be 1-D and of the same length")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards contain NaN or inf")
    scale = resolve_scale_rewards(estimator, scale_rewards)
    adv = np.zeros_like(r)
    batch_std = _std(r)
    for rows, block in _group_blocks(r, _codes(group_ids)):
        centred = block - block.mean(axis=1, keepdims=True)
        if scale == "group":
            centred = centred / (_std(block) + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        adv[rows] = centred
    return adv


def dense_step_advantages(
    seq_advantages: Sequence[float] | np.ndarray,
    group_ids: GroupIds,
    spans: pl.DataFrame,
    lengths: Sequence[int] | np.ndarray,
    alpha: float = 1.0,
) -> pl.Series:
    """Token-level advantages for `prm_dense` (formula in the module docstring): one
    List(Float64) per response.

    `spans` holds the steps, one row each in response then step order: ``row`` (the
    response's index), ``token_start``, ``token_end`` (exclusive), ``score``; steps with a
    null offset or a null or non-finite score are unscored. `lengths[i]` is response i's
    length in tokens.
    """
    a = np.asarray(seq_advantages, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.int64)
    codes = _codes(group_ids)
    scored = spans.filter(
        pl.col("token_start").is_not_null() & pl.col("token_end").is_not_null()
        & pl.col("score").is_not_null() & pl.col("score").is_finite()
    )
    row = scored["row"].cast(pl.Int64).to_numpy()
    score = scored["score"].cast(pl.Float64).to_numpy()
    centre = np.zeros(codes.max() + 1 if codes.size else 0)
    for rows, block in _group_blocks(score, codes[row]):
        centre[codes[row[rows[:, 0]]]] = block.mean(axis=1)
    delta = alpha * (score - centre[codes[row]])
    # Python slice semantics of tok[max(0, start):min(n, end)]
    size = n[row]
    start = np.maximum(0, scored["token_start"].cast(pl.Int64).to_numpy())
    end = np.minimum(size, scored["token_end"].cast(pl.Int64).to_numpy())
    end = np.where(end < 0, np.maximum(0, end + size), end)
    width = np.maximum(0, end - start)
    offsets = np.concatenate([[0], np.cumsum(n)])
    tok = np.repeat(a, n)
    # a response's steps add in step order: add the j-th scored step of every response at once
    first = np.diff(row, prepend=-1) != 0
    step = np.arange(row.size) - np.maximum.accumulate(np.where(first, np.arange(row.size), 0))
    for j in range(int(step.max()) + 1 if step.size else 0):
        sel = np.flatnonzero((step == j) & (width > 0))
        w = width[sel]
        within = np.arange(w.sum()) - np.repeat(np.cumsum(w) - w, w)
        idx = np.repeat(offsets[row[sel]] + start[sel], w) + within
        tok[idx] += np.repeat(delta[sel], w)
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tok)))


def zero_groups(
    advantages: Sequence[float] | np.ndarray | pl.Series, group_ids: GroupIds, atol: float = 0.0
) -> set[Any]:
    """The ids of the groups in which every advantage is zero (|A| <= atol): no gradient.

    `advantages`: one per response, or a List series of per-token ones (`prm_dense`).
    """
    if isinstance(advantages, pl.Series) and advantages.dtype == pl.List:
        element = pl.element()
        nonzero = advantages.list.eval((element.abs() > atol) & element.is_not_nan()).list.any()
    else:
        nonzero = pl.Series(np.abs(np.asarray(advantages, dtype=np.float64)) > atol)
    frame = pl.DataFrame({"group": _series(group_ids), "nonzero": nonzero})
    dead = frame.group_by("group").agg(pl.col("nonzero").any()).filter(~pl.col("nonzero"))
    return set(dead["group"].to_list())


def soft_overlong_punishment(length: pl.Expr, max_completion_len: int, soft_punish_cache: int,
                             factor: float = 1.0) -> pl.Expr:
    """`factor` * R(L) of the module docstring for a token-count expression, as Float64
    (verl's `overlong_buffer`: len = Lcache, penalty_factor = factor)."""
    if not 0 < soft_punish_cache <= max_completion_len:
        raise ValueError(f"soft_punish_cache must be in (0, max_completion_len], got "
                         f"{soft_punish_cache} for max_completion_len {max_completion_len}")
    free = max_completion_len - soft_punish_cache
    return ((free - length.cast(pl.Float64)) / soft_punish_cache).clip(-1.0, 0.0) * factor
