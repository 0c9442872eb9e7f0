"""Group-relative advantages (DESIGN.md section 1, step 6). Pure numpy, no torch.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ESTIMATORS = ("grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
EPS = 1e-4


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


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if x.size > 1 else 0.0


def group_advantages(
    rewards: Sequence[float] | np.ndarray,
    group_ids: Sequence[object] | np.ndarray,
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
    _, inverse = np.unique(np.asarray(group_ids, dtype=object).astype(str), return_inverse=True)
    adv = np.zeros_like(r)
    batch_std = _std(r)
    for g in range(inverse.max() + 1 if r.size else 0):
        idx = np.flatnonzero(inverse == g)
        centred = r[idx] - r[idx].mean()
        if scale == "group":
            centred = centred / (_std(r[idx]) + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        adv[idx] = centred
    return adv


def dense_step_advantages(
    seq_advantages: Sequence[float] | np.ndarray,
    group_ids: Sequence[object] | np.ndarray,
    step_spans: Sequence[Sequence[tuple[int, int, float]] | None],
    lengths: Sequence[int],
    alpha: float = 1.0,
) -> list[np.ndarray]:
    """Token-level advantages for `prm_dense` (formula in the module docstring).

    `step_spans[i]` lists (token_start, token_end, score) of response i's steps (end
    exclusive; None or empty: unscored); `lengths[i]` is its response length in tokens.
    """
    groups = np.asarray(group_ids, dtype=object).astype(str)
    centre: dict[str, float] = {}
    for g in np.unique(groups):
        scores = [s for i in np.flatnonzero(groups == g) for (_, _, s) in (step_spans[i] or [])
                  if s is not None and np.isfinite(s)]
        centre[g] = float(np.mean(scores)) if scores else 0.0
    out = []
    for i, (a, n) in enumerate(zip(seq_advantages, lengths, strict=True)):
        tok = np.full(int(n), float(a), dtype=np.float64)
        for start, end, score in step_spans[i] or []:
            if score is None or not np.isfinite(score):
                continue
            tok[max(0, start):min(int(n), end)] += alpha * (score - centre[groups[i]])
        out.append(tok)
    return out


def zero_groups(
    advantages: Sequence[np.ndarray | float], group_ids: Sequence[object], atol: float = 0.0
) -> set[str]:
    """Groups in which every advantage (scalar or per-token) is zero: no gradient, skipped."""
    groups = np.asarray(group_ids, dtype=object).astype(str)
    nonzero = {g for g, a in zip(groups, advantages, strict=True)
               if np.any(np.abs(np.asarray(a, dtype=np.float64)) > atol)}
    return set(groups.tolist()) - nonzero
