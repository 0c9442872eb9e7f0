"""The mixed on/off-policy objective of SCOPE and LUFFY (DESIGN.md section 1, step 6).

Per response token t of response i, with advantage A (one per response, or per token for
`prm_dense`), current log-prob l = log pi_theta(t) at temperature T and p = exp(l):

  on-policy token (t < off_policy_start), PPO clip against the old policy:
      rho = exp(l - l_old)
      L_t = -min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon_high) * A)
  off-policy token (t >= off_policy_start), LUFFY's policy shaping, behaviour prob taken as 1,
  no clipping:
      f(p) = p / (p + gamma)
      L_t = -f(p) * A,    dL_t/dl = -A * gamma * p / (p + gamma)^2
  optional terms on every token:
      + beta * KL_t,      KL_t = exp(l_ref - l) - (l_ref - l) - 1   (k3 estimator)
      - entropy_coef * H_t,  H_t = entropy of pi_theta(. | prefix) at temperature T

GSPO (`importance_sampling_level="sequence"`, TRL's name): one ratio per response from the
mean log-ratio over its on-policy tokens O_i, clipped per sequence and applied to each of them
(off-policy tokens keep the shaping above):
      s_i = exp( sum_{t in O_i} (l_t - l_old_t) / |O_i| )
      L_t = -min(s_i * A, clip(s_i, 1 - epsilon, 1 + epsilon_high) * A)      t in O_i
      dL_t/dl_u = -A * s_i / |O_i|   for u in O_i (unclipped), so the seq_mean of i has gradient
      -A * s_i * mean_{u in O_i} grad l_u, GSPO's sequence-level gradient

Behaviour/trainer mismatch (TRL's `vllm_importance_sampling_*`, `behaviour_weights`): with
old log-probs recomputed by the trainer (l_old) and the engine's behaviour log-probs b of the
sampled tokens, the on-policy loss is weighted by a truncated importance weight w:
      token level:     r_t = exp(l_old_t - b_t)
      sequence level:  r_i = exp( sum_{t in O_i} (l_old_t - b_t) )     (a sum, as TRL)
      truncate:  w = clamp(r, C_min, C_max)        mask:  w = r if C_min <= r <= C_max else 0
      L_t = w * L_t      (t in O_i; teacher tokens have no behaviour log-prob and keep f(p))
A non-finite b (the engine gave none) has r = 1, as in TRL.

Aggregation over the token mask m (N = `num_items`, the count over the whole optimizer step
across gradient-accumulation micro-batches and processes; local counts by default):
  token_mean:  sum_{i,t} m L / N_tokens
  seq_mean:    sum_i (sum_t m L / sum_t m) / N_seqs
  constant:    sum_{i,t} m L / (N_seqs * max_length)       (Dr. GRPO, LUFFY's released runs)
TRL's `loss_type` names are accepted too (`LOSS_TYPES`): grpo = seq_mean, bnpo = dapo =
token_mean, dr_grpo = constant (max_length plays max_completion_length).

Data-side pieces of DAPO: `mask_truncated_completions` drops rows cut at the length limit from
the loss (`scope train --mask-truncated-completions`, applied by the collator);
`overlong_penalty` is its soft overlong punishment, a reward term (`scope train
--soft-punish-cache`, applied in assembly before the advantages).

Log-probs come from `selective_log_softmax`, which never materialises a full-vocabulary
log-softmax for the whole batch: per chunk of rows it takes logsumexp and gathers the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "constant")
# TRL's GRPOConfig.loss_type names (TRL 1.10.0.dev0, main of July 2026; "dapo" since 0.22)
LOSS_TYPES = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "constant",
              "dapo": "token_mean"}
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# TRL's GRPOConfig.vllm_importance_sampling_mode values (TRL 1.16; its default sequence_mask)
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IS_KEYS = ("is_units", "is_ratio", "is_outside", "is_ratio_max", "is_ratio_min", "lp_known",
           "lp_diff", "lp_diff_max", "k1", "k3", "kept_mass")
METRIC_KEYS = ("tokens", "seqs", "on_tokens", "off_tokens", "clipped_tokens", "shaped_weight",
               "entropy", "kl", "off_prob") + IS_KEYS
# how metric sums combine across micro-batches and processes (default: add)
METRIC_REDUCE = {"is_ratio_max": "max", "lp_diff_max": "max", "is_ratio_min": "min"}


def _scaled(t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`t / temperature` in float32 for half-precision input (no copy when nothing changes)."""
    t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return t / temperature if temperature != 1.0 else t


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Forward: per row chunk, target logit minus logsumexp. Backward: writes
    d/dlogits = (onehot(index) - softmax) * grad / T chunk by chunk into one preallocated
    tensor, so the only (B, L, V) allocation is the gradient itself."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, index: torch.Tensor, temperature: float,
                chunk_rows: int) -> torch.Tensor:
        out, lses = [], []
        for s in range(0, logits.shape[0], chunk_rows):
            chunk = _scaled(logits[s : s + chunk_rows], temperature)
            lse = torch.logsumexp(chunk, dim=-1)
            out.append(chunk.gather(-1, index[s : s + chunk_rows, :, None])[..., 0] - lse)
            lses.append(lse)
        ctx.save_for_backward(logits, index, torch.cat(lses))
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        logits, index, lse = ctx.saved_tensors
        temp, rows = ctx.temperature, ctx.chunk_rows
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            g = grad_out[s : s + rows, :, None].to(lse.dtype)
            p = (_scaled(logits[s : s + rows], temp) - lse[s : s + rows, :, None]).exp_()
            p.mul_(-g).scatter_add_(-1, index[s : s + rows, :, None], g)
            grad[s : s + rows] = p / temp if temp != 1.0 else p
        return grad, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4
) -> torch.Tensor:
    """log softmax(logits / T)[index] for logits (B, L, V) and index (B, L) -> (B, L).

    Never materialises the batch's full log-softmax: rows are processed `chunk_rows`
    sequences at a time in forward and backward, and autograd keeps only the logits (which
    exist anyway) and one logsumexp per position. Half-precision logits are computed in
    float32; the result is float32 (float64 for float64 logits).
    """
    return _SelectiveLogSoftmax.apply(logits, index, float(temperature), int(chunk_rows))


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4
) -> torch.Tensor:
    """Per-position entropy of softmax(logits / T), (B, L, V) -> (B, L), chunked over rows."""
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = _scaled(logits[start : start + chunk_rows], temperature)
        lse = torch.logsumexp(chunk, dim=-1)
        out.append(lse - (torch.softmax(chunk, dim=-1) * chunk).sum(-1))
    return torch.cat(out, dim=0)


def aggregation_of(loss_type: str) -> str:
    """Our aggregation for a TRL loss_type name; our own names map to themselves."""
    aggregation = LOSS_TYPES.get(loss_type, loss_type)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {loss_type!r}; use one of "
                         f"{AGGREGATIONS + tuple(LOSS_TYPES)}")
    return aggregation


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    max_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (B, L) per-token losses to a scalar (formulas in the module docstring).

    `aggregation` is one of `AGGREGATIONS` or a TRL name of `LOSS_TYPES`. `num_items` is the
    divisor's count (tokens for token_mean, sequences otherwise); by default the local count
    of this batch.
    """
    aggregation = aggregation_of(aggregation)
    masked = token_loss * mask
    if aggregation == "token_mean":
        n = mask.sum().clamp(min=1) if num_items is None else num_items
        return masked.sum() / n
    n = mask.shape[0] if num_items is None else num_items
    if aggregation == "seq_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n
    if not max_length:
        raise ValueError("aggregation 'constant' needs max_length")
    return masked.sum() / (n * max_length)


def mixed_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    off_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    shaping_gamma: float = 0.1,
    aggregation: str = "token_mean",
    max_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    importance_sampling_level: str = "token",
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of the module docstring.

    Shapes: logp, old_logp, mask, off_mask (B, L); advantages (B,) or (B, L). `old_logp` is
    ignored (may be NaN) on off-policy and masked tokens. `importance_sampling_level` is
    "token" (PPO/GRPO) or "sequence" (GSPO; on-policy tokens of a clipped sequence all count
    as clipped). `is_weight` (B, L), from `behaviour_weights`, multiplies the on-policy loss
    (the engine/trainer mismatch correction). Returns (loss, metric sums): the sums (see
    `METRIC_KEYS`; the `IS_KEYS` ones come from `behaviour_weights`) are detached local totals,
    so they can be combined across micro-batches and processes before `metrics_from_sums`.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"use one of {IMPORTANCE_SAMPLING_LEVELS}")
    mask = mask.to(logp.dtype)
    off = off_mask.bool() & mask.bool()
    on = ~off_mask.bool() & mask.bool()
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    eps_high = epsilon if epsilon_high is None else epsilon_high

    # On-policy: PPO clip. Old log-probs of other tokens are replaced so NaNs cannot leak.
    old = torch.where(on, old_logp.to(logp.dtype), logp.detach())
    if importance_sampling_level == "token":
        ratio = torch.exp(logp - old)
    else:  # GSPO: s_i from the mean log-ratio of the on-policy tokens, shape (B, 1)
        n_on = on.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)
        ratio = torch.exp(((logp - old) * on).sum(-1, keepdim=True) / n_on)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv
    on_loss = -torch.min(unclipped, clipped)
    if is_weight is not None:
        on_loss = on_loss * is_weight.detach().to(logp.dtype)
    # Off-policy: LUFFY shaping f(p) = p / (p + gamma), no clip, no behaviour prob.
    p = torch.exp(logp)
    weight = p / (p + shaping_gamma)
    off_loss = -weight * adv
    token_loss = torch.where(off, off_loss, on_loss)

    kl = None
    if ref_logp is not None and beta != 0.0:
        delta = ref_logp.to(logp.dtype) - logp
        kl = torch.exp(delta) - delta - 1
        token_loss = token_loss + beta * kl
    if entropy is not None and entropy_coef != 0.0:
        token_loss = token_loss - entropy_coef * entropy
    loss = aggregate(token_loss, mask, aggregation, max_length, num_items)

    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        is_clipped = on & (low | high)
        zero = logp.new_zeros(())
        sums = {
            "tokens": mask.sum(), "seqs": (mask.sum(-1) > 0).sum().to(logp.dtype),
            "on_tokens": on.sum().to(logp.dtype), "off_tokens": off.sum().to(logp.dtype),
            "clipped_tokens": is_clipped.sum().to(logp.dtype),
            "shaped_weight": (weight * off).sum(), "off_prob": (p * off).sum(),
            "entropy": zero if entropy is None else (entropy.detach() * mask).sum(),
            "kl": zero if kl is None else (kl.detach() * mask).sum(),
        }
    return loss, sums


def empty_is_sums(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """`IS_KEYS` sums of a batch without mismatch statistics (behaviour log-probs as pi_old)."""
    z = torch.zeros((), device=device)
    return {**{k: z for k in IS_KEYS}, "is_ratio_max": z - math.inf, "lp_diff_max": z - math.inf,
            "is_ratio_min": z + math.inf}


def combine_sums(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Metric sums of two micro-batches together (`METRIC_REDUCE`: max/min, else add)."""
    ops = {"max": torch.maximum, "min": torch.minimum}
    out = dict(a)
    for k, v in b.items():
        op = METRIC_REDUCE.get(k)
        out[k] = v if k not in a else (ops[op](torch.as_tensor(a[k]), torch.as_tensor(v))
                                       if op else a[k] + v)
    return out


def mask_truncated_completions(
    mask: torch.Tensor, finish_reasons: Sequence[str | None] | torch.Tensor
) -> torch.Tensor:
    """`mask` (B, L) with the rows of truncated completions zeroed (TRL's
    mask_truncated_completions, DAPO): `finish_reasons` holds one finish_reason per row
    ("length" = cut at the limit) or is a bool tensor (B,) True where truncated.

    The rows still count in their group's advantages and as sequences in the seq_mean and
    constant divisors; count tokens for token_mean after masking.
    """
    if isinstance(finish_reasons, torch.Tensor):
        truncated = finish_reasons.to(device=mask.device, dtype=torch.bool)
    else:
        truncated = torch.tensor([r == "length" for r in finish_reasons], device=mask.device)
    return mask * (~truncated).unsqueeze(-1).to(mask.dtype)


def overlong_penalty(
    lengths: Sequence[int] | torch.Tensor,
    max_completion_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term per response length L (float64):

        R(L) = factor * 0                             L <= Lmax - Lcache
               factor * (Lmax - Lcache - L) / Lcache   Lmax - Lcache < L <= Lmax
               factor * -1                            L > Lmax

    with Lmax = max_completion_length, Lcache = overlong_buffer_len (verl's
    `overlong_buffer.len`; its reward manager computes the same for L <= Lmax). The formula
    lives in `scope_data.advantages.soft_overlong_punishment`, which `scope train` applies in
    assembly (`soft_punish_cache`); this is its tensor form.
    """
    import polars as pl

    from scope_data.advantages import soft_overlong_punishment

    try:
        expr = soft_overlong_punishment(pl.col("n"), max_completion_length, overlong_buffer_len,
                                        penalty_factor)
    except ValueError as e:
        raise ValueError(str(e).replace("soft_punish_cache", "overlong_buffer_len")
                         .replace("max_completion_len ", "max_completion_length ")) from None
    n = torch.as_tensor(lengths).tolist()
    out = pl.DataFrame({"n": n}, schema={"n": pl.Int64}).select(expr.alias("p"))["p"]
    return torch.tensor(out.to_list(), dtype=torch.float64)


def metrics_from_sums(sums: dict[str, Any]) -> dict[str, float]:
    """Ratios from metric sums: clip fraction (of on-policy tokens), off-policy token share,
    mean shaped weight f(p) and mean p (of off-policy tokens), mean entropy and KL per token;
    the mismatch statistics of `behaviour_weights` (0 where nothing was measured, as TRL)."""
    sums = {**dict.fromkeys(METRIC_KEYS, 0.0), **empty_is_sums(), **sums}  # absent: none
    s = {k: float(v) for k, v in sums.items()}

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    def finite(x: float) -> float:
        return x if math.isfinite(x) else 0.0

    return {
        "clip_fraction": div(s["clipped_tokens"], s["on_tokens"]),
        "off_policy_share": div(s["off_tokens"], s["tokens"]),
        "shaped_weight": div(s["shaped_weight"], s["off_tokens"]),
        "off_policy_prob": div(s["off_prob"], s["off_tokens"]),
        "entropy": div(s["entropy"], s["tokens"]),
        "kl": div(s["kl"], s["tokens"]),
        "tokens": s["tokens"],
        "sequences": s["seqs"],
        # TRL: sampling/importance_sampling_ratio/{mean,min,max} (after truncation/masking)
        "is_ratio_mean": div(s["is_ratio"], s["is_units"]),
        "is_ratio_min": finite(s["is_ratio_min"]),
        "is_ratio_max": finite(s["is_ratio_max"]),
        "is_outside_fraction": div(s["is_outside"], s["is_units"]),  # truncated or masked
        # TRL: sampling/sampling_logp_difference/{mean,max}, |l_old - b|
        "sampling_logp_difference_mean": div(s["lp_diff"], s["lp_known"]),
        "sampling_logp_difference_max": finite(s["lp_diff_max"]),
        "behaviour_kl_k1": div(s["k1"], s["lp_known"]),
        "behaviour_kl_k3": div(s["k3"], s["lp_known"]),
        "kept_mass": div(s["kept_mass"], s["lp_known"]),
    }


def behaviour_weights(
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    on: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
    full_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated/masked importance weights of the engine -> trainer mismatch (module docstring;
    TRL's `vllm_importance_sampling_mode` / `_clip_min` / `_clip_max`).

    old_logp: trainer log-probs at round start (renormalised over the replayed top-k/top-p
    support when sampling truncated, -inf for a token outside it); behaviour_logp: the engine's
    (NaN where unknown); on: on-policy token mask, all (B, L); full_logp: the trainer's
    full-vocabulary log-probs when old_logp is replayed (for the kept-mass statistic).
    Returns (w (B, L), detached metric sums of `IS_KEYS`): ratio count/sum/max/min and count
    outside [clip_min, clip_max] (per token, or per sequence at sequence level), and over the
    on-policy tokens with a finite difference d = l_old - b: |d| sum and max, KL(behaviour ||
    trainer) estimates k1 = -d and k3 = exp(d) - d - 1, and the kept mass exp(full - old).
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}; use one of {IS_MODES}")
    with torch.no_grad():
        on = on.bool()
        old, beh = old_logp.float(), behaviour_logp.float()
        diff = torch.where(on & torch.isfinite(beh), old - beh, torch.zeros_like(old))
        if mode.startswith("sequence"):
            raw, units = diff.sum(-1, keepdim=True).exp(), on.any(-1, keepdim=True)
        else:
            raw, units = diff.exp(), on
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        outside = (raw < lo) | (raw > hi)
        w = raw.clamp(min=clip_min, max=clip_max) if mode.endswith("truncate") else (
            raw.masked_fill(outside, 0.0))
        ratios = w[units]
        known = on & torch.isfinite(beh) & torch.isfinite(diff)
        d = diff[known]
        kept = (full_logp.float() - old)[known] if full_logp is not None else d.new_zeros(
            d.shape)
        sums = {
            "is_units": units.sum().float(), "is_ratio": ratios.sum(),
            "is_outside": (outside & units).sum().float(),
            "is_ratio_max": ratios.max() if ratios.numel() else old.new_tensor(-math.inf),
            "is_ratio_min": ratios.min() if ratios.numel() else old.new_tensor(math.inf),
            "lp_known": known.sum().float(), "lp_diff": d.abs().sum(),
            "lp_diff_max": d.abs().max() if d.numel() else old.new_tensor(-math.inf),
            "k1": (-d).sum(), "k3": (d.exp() - d - 1).sum(), "kept_mass": kept.exp().sum(),
        }
    return w.expand_as(old).to(old_logp.dtype), sums
