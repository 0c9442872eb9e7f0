"""Helpers of the trainer tests: schema-conformant corrected tables built by hand, and exact
per-token log-probs of a model folder (for behaviour log-probs and before/after checks)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_data.hashing import stable_id
from scope_data.schema import SCHEMAS, conform
from scope_data.shards import TableStore

NAN = float("nan")


def blank_value(field: pa.Field) -> Any:
    """A placeholder of a schema field: None where nullable, else the type's zero value."""
    t = field.type
    if field.nullable:
        return None
    if pa.types.is_list(t):
        return []
    if pa.types.is_string(t):
        return ""
    if pa.types.is_boolean(t):
        return False
    if pa.types.is_integer(t):
        return 0
    if pa.types.is_floating(t):
        return 0.0
    raise TypeError(f"no placeholder for column {field.name!r} of type {t}")


def make_row(problem_id: str, rollout_id: str, prompt_ids: list[int], response_ids: list[int],
             reward: float, *, round_: int = 0, kind: str = "policy",
             logprobs: list[float] | None = None, source: str | None = None,
             off_policy_start: int | None = None, steps: list[dict[str, Any]] | None = None,
             correct_status: str | None = None) -> dict[str, Any]:
    """One corrected-table row: every column of the schema, placeholders where the trainer
    does not look, the given values where it does."""
    n = len(response_ids)
    row = {f.name: blank_value(f) for f in SCHEMAS["corrected"]}
    row.update({
        "problem_id": problem_id, "source": "test", "task": "arith",
        "prompt": f"prompt of {problem_id}", "answer": "0", "rollout_id": rollout_id,
        "round": round_, "policy": "hf:tiny", "prompt_text": "p",
        "prompt_token_ids": list(prompt_ids), "response_text": "r",
        "response_token_ids": list(response_ids),
        "behaviour_logprobs": list(logprobs) if logprobs is not None else [-1.0] * n,
        "finish_reason": "stop", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "engine": "hf",
        "reward": float(reward),
        "correct": reward > 0, "status": "ok", "steps": steps or [], "prm": "rule:arith",
        "threshold": 0.5, "score_status": "ok", "kind": kind, "source_rollout_id": source,
        "prefix_steps": None if kind == "policy" else 1, "off_policy_start": off_policy_start,
        "teacher": None if kind == "policy" else "oracle:arith",
        "correct_status": correct_status or ("accepted" if kind == "corrected" else "not_failed"),
    })
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return conform("corrected", pa.Table.from_pylist(rows))


def write_corrected(url: str | Path, rows: list[dict[str, Any]]) -> str:
    TableStore(str(url), "corrected").write(to_table(rows), config={"test": True})
    return str(url)


def token_logprobs(model: Any, prompt_ids: list[int], response_ids: list[int],
                   temperature: float = 1.0) -> list[float]:
    """log pi(response_t | prompt, response_<t) for one sequence, no padding."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]
    return lp.tolist()


def encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def scope_group(tok: Any, model: Any, problem: str, *, n_fail: int = 2, off_start: int = 6,
                fail_texts: list[str] | None = None, fix_text: str | None = None
                ) -> list[dict[str, Any]]:
    """A problem whose G = n_fail + 1 policy rollouts all failed; the last one is corrected.

    After assembly the group holds n_fail failed policy responses (reward 0) and one
    correction (reward 1) whose tokens from `off_start` on are the teacher's (`fix_text`).
    """
    prompt = encode(tok, f"Mod 10. Start with {problem}. Add 3.\n")
    rows = []
    for k in range(n_fail + 1):
        text = fail_texts[k] if fail_texts else f"{problem} + 3 = {k}\nAnswer: {k}"
        resp = encode(tok, text) + [tok.eos_token_id]
        rid = stable_id(problem, k)
        rows.append(make_row(problem, rid, prompt, resp, 0.0,
                             logprobs=token_logprobs(model, prompt, resp),
                             correct_status="accepted" if k == n_fail else "not_scored"))
    source = rows[-1]
    good = (int(problem) + 3) % 10
    fixed = encode(tok, fix_text or f"{problem} + 3 = {good}\nAnswer: {good}")
    fixed += [tok.eos_token_id]
    corrected = source["response_token_ids"][:off_start] + fixed[off_start:]
    lp = token_logprobs(model, prompt, corrected)[:off_start]
    rows.append(make_row(problem, stable_id(problem, "fix"), prompt, corrected, 1.0,
                         kind="corrected", source=source["rollout_id"],
                         off_policy_start=off_start,
                         logprobs=lp + [NAN] * (len(corrected) - off_start)))
    return rows


def assert_finite(values: list[float]) -> None:
    assert all(math.isfinite(v) for v in values)
