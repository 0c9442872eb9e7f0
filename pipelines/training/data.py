"""Training rows as tensors: dataset, collator and the per-token log-prob forward pass.

Batch layout (TRL's): prompts left-padded, responses right-padded, so every response starts
at the same column and the model only has to produce logits for the last R + 1 positions
(`logits_to_keep`):

    input_ids      [pad pad p p p | r r r r pad]      (B, P + R)
    response_mask                  [1 1 1 1 0]         (B, R), all 0 for a truncated row
                                                       under mask_truncated_completions
    off_mask                       [0 0 1 1 0]         token index >= off_policy_start
    advantages                     (B, R)              scalar per response, broadcast
    old_logp                       (B, R)              behaviour log-probs (0 where unused)
    behaviour_logp                 (B, R)              behaviour log-probs (NaN where unknown)
    top_p, top_k                   (B, 1)              the row's sampling truncation (1.0, 0: off)

Position ids count real tokens only, so left padding does not shift positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import polars as pl


@dataclass
class TrainRow:
    rollout_id: str
    prompt: list[int]
    response: list[int]
    off_policy_start: int
    advantage: float
    token_advantages: list[float] | None
    old_logp: list[float]
    behaviour: list[float]
    top_p: float = 1.0
    top_k: int = 0
    truncated: bool = False  # finish_reason "length", or cut at max_length


class ResponseDataset:
    """One item per assembled response, truncated to `max_length` response tokens.

    `mask_truncated`: the collator zeroes the response mask of truncated rows (finish_reason
    "length" in the table, or cut here), TRL's mask_truncated_completions; `masked` counts them.
    """

    def __init__(self, rows: pl.DataFrame, max_length: int, old_logprobs: str = "behaviour",
                 mask_truncated: bool = False):
        self.rows: list[TrainRow] = []
        self.truncated = 0
        self.mask_truncated = mask_truncated
        for r in rows.iter_rows(named=True):
            resp = list(r["response_token_ids"])
            cut = len(resp) > max_length
            if cut:
                self.truncated += 1
            n = min(len(resp), max_length)
            start = min(int(r["off_policy_start"]), n)
            old = [0.0 if x is None else float(x) for x in r["behaviour_logprobs"][:n]]
            if old_logprobs == "behaviour":
                bad = [t for t in range(start) if not math.isfinite(old[t])]
                if bad:
                    raise ValueError(
                        f"rollout {r['rollout_id']!r}: behaviour log-prob of on-policy token "
                        f"{bad[0]} is not finite; use old_logprobs='recompute'"
                    )
            tok_adv = r["token_advantages"]
            self.rows.append(TrainRow(
                rollout_id=r["rollout_id"], prompt=list(r["prompt_token_ids"]),
                response=resp[:n], off_policy_start=start, advantage=float(r["advantage"]),
                token_advantages=None if tok_adv is None else list(tok_adv[:n]),
                old_logp=[x if math.isfinite(x) else 0.0 for x in old],
                behaviour=[x if math.isfinite(x) else math.nan for x in old],
                top_p=float(r.get("top_p") or 1.0), top_k=int(r.get("top_k") or 0),
                truncated=cut or bool(r.get("truncated")),
            ))
        self.masked = sum(r.truncated for r in self.rows) if mask_truncated else 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"row_idx": i}

    def num_tokens(self) -> int:
        return sum(len(r.response) for r in self.rows)


class Collator:
    """Builds padded batch tensors (layout in the module docstring) from dataset indices."""

    def __init__(self, dataset: ResponseDataset, pad_token_id: int):
        self.dataset = dataset
        self.pad = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        idx = [int(it["row_idx"]) for it in items]
        rows = [self.dataset.rows[i] for i in idx]
        P = max(len(r.prompt) for r in rows)
        R = max(max(len(r.response) for r in rows), 1)
        B = len(rows)
        input_ids = torch.full((B, P + R), self.pad, dtype=torch.long)
        attn = torch.zeros((B, P + R), dtype=torch.long)
        resp_mask = torch.zeros((B, R), dtype=torch.float32)
        off_mask = torch.zeros((B, R), dtype=torch.bool)
        adv = torch.zeros((B, R), dtype=torch.float32)
        old = torch.zeros((B, R), dtype=torch.float32)
        behaviour = torch.full((B, R), math.nan, dtype=torch.float32)
        for b, r in enumerate(rows):
            n, p = len(r.response), len(r.prompt)
            input_ids[b, P - p : P] = torch.tensor(r.prompt, dtype=torch.long)
            input_ids[b, P : P + n] = torch.tensor(r.response, dtype=torch.long)
            attn[b, P - p : P + n] = 1
            resp_mask[b, :n] = 1
            off_mask[b, r.off_policy_start : n] = True
            adv[b, :n] = (torch.tensor(r.token_advantages) if r.token_advantages is not None
                          else r.advantage)
            old[b, :n] = torch.tensor(r.old_logp)
            behaviour[b, :n] = torch.tensor(r.behaviour)
        if self.dataset.mask_truncated:
            from pipelines.training.loss import mask_truncated_completions

            resp_mask = mask_truncated_completions(
                resp_mask, torch.tensor([r.truncated for r in rows]))
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids,
                "response_mask": resp_mask, "off_mask": off_mask, "advantages": adv,
                "old_logp": old, "behaviour_logp": behaviour,
                "top_p": torch.tensor([[r.top_p] for r in rows], dtype=torch.float32),
                "top_k": torch.tensor([[r.top_k] for r in rows], dtype=torch.long),
                "row_idx": torch.tensor(idx, dtype=torch.long)}


def response_logprobs(
    model: Any, batch: dict[str, Any], temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = False, chunk_rows: int = 4,
) -> tuple[Any, Any]:
    """(log-probs (B, R), entropy (B, R) or None) of the response tokens under `model`."""
    import torch

    from pipelines.training.loss import entropy_from_logits, selective_log_softmax

    logits, targets = _response_logits(model, batch)
    logp = selective_log_softmax(logits, targets, temperature, chunk_rows)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits, temperature, chunk_rows)
    return logp, entropy


def _response_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(logits (B, R, V) predicting each response token, the response tokens (B, R))."""
    R = batch["response_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=R + 1, use_cache=False)
    return out.logits[:, :-1, :], batch["input_ids"][:, -R:]  # position j predicts token j + 1


def replayed_logprobs(model: Any, batch: dict[str, Any], temperature: float = 1.0,
                      chunk_rows: int = 4) -> tuple[Any, Any]:
    """(full-vocabulary log-probs, log-probs renormalised over the tokens each row's top-k /
    top-p keeps), both (B, R), from one forward pass.

    The second replays the engine's truncation on the trainer's distribution (the hf engine's
    `process_logits`, vLLM's rule): log q(y) = log p(y) - log(kept mass), -inf where y is not
    kept. Rows without truncation get the full log-probs.
    """
    import torch

    from pipelines.engines.hf import process_logits
    from pipelines.training.loss import selective_log_softmax

    logits, targets = _response_logits(model, batch)
    full = selective_log_softmax(logits, targets, temperature, chunk_rows)
    kept = []
    for s in range(0, logits.shape[0], chunk_rows):
        chunk = logits[s : s + chunk_rows]
        b, L, V = chunk.shape
        per_row = {k: batch[k][s : s + chunk_rows].to(chunk.device).repeat_interleave(L, 0)
                   for k in ("top_p", "top_k")}
        lq = process_logits(chunk.reshape(b * L, V), torch.full((b * L, 1), float(temperature),
                            device=chunk.device), per_row["top_p"], True, per_row["top_k"])
        kept.append(lq.gather(-1, targets[s : s + chunk_rows].reshape(-1, 1)).view(b, L))
    return full, torch.cat(kept).to(full.dtype)
