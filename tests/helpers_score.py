"""A synthetic arith rollouts table (rollouts schema, char-tokenizer token ids) for the score and
prm-eval tests: canonical, slipped, unfinished, empty and oversized responses."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa


def char_tokenizer_dir(out: Path) -> Path:
    from pipelines.tiny.tokenizer import save_char_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    save_char_tokenizer(out)
    return out


def arith_rollout_rows(tok_dir: Path, n_problems: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """Four responses per problem: canonical, one slip, one slip (other draw), a random mix of
    unfinished / garbage / empty / a 10,000-character single step."""
    from transformers import AutoTokenizer

    from pipelines.tiny.prm import slipped_solution
    from scope_data.hashing import stable_id
    from scope_data.tasks import arith

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(seed)
    rows = []
    for i, p in enumerate(arith.generate_problems(n_problems, seed=seed)):
        pid = stable_id("arith", i, p.prompt)
        odd = rng.choice([
            "\n".join(p.solution_lines[:2]),  # stops early
            "7 + 7 = 4\nno idea\nAnswer: 3",
            "",
            "9" * 10_000,
        ])
        for s, text in enumerate([p.solution, slipped_solution(p, rng), slipped_solution(p, rng),
                                  odd]):
            ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            correct = arith.is_correct(p, text)
            rows.append({
                "problem_id": pid, "source": "arith", "source_index": i, "task": "arith",
                "prompt": p.prompt, "answer": p.answer, "solution": p.solution,
                "rollout_id": stable_id(pid, 0, s, seed), "round": 0, "sample_idx": s,
                "policy": f"hf:{tok_dir}", "prompt_text": p.prompt,
                "prompt_token_ids": tok.encode(p.prompt, add_special_tokens=False),
                "response_text": text, "response_token_ids": ids,
                "behaviour_logprobs": [-0.5] * len(ids), "finish_reason": "stop",
                "temperature": 1.0, "top_p": 1.0, "seed": seed,
                "pred_answer": arith.extract_answer(text), "reward": float(correct),
                "correct": correct, "status": "ok" if text else "empty_response",
            })
    return rows


def write_rollouts(url: str, rows: list[dict[str, Any]]) -> None:
    from scope_data.schema import SCHEMAS
    from scope_data.shards import TableStore

    table = pa.Table.from_pylist(rows, schema=SCHEMAS["rollouts"])
    TableStore(url, "rollouts").write(table, {"test": "synthetic", "rows": len(rows)})
