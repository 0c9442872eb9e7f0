"""How a PRM renders (problem, steps) into token ids and where it reads each step's score.

Shared by the transformers (`prm_hf`) and vLLM (`prm_vllm`) PRM engines, so both score exactly
the same input: family "cls" (Qwen2.5-Math-PRM style, chat template, a separator after each
step) and family "tag" (Math-Shepherd style, a tag after each step). Also the context rule both
apply: an input longer than the context keeps its head; the steps whose tag falls beyond are NaN
and the row's status is "truncated".
"""

from __future__ import annotations

import math
from typing import Any

from pipelines.engines.base import PRMScores

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def single_token_id(tokenizer: Any, token: str, what: str) -> int:
    """The id of `token`: a vocabulary entry, or a string that encodes to exactly one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
        return tid
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"{what} {token!r} is not a single token of this tokenizer (encodes to {ids}); "
            f"pass a token from the model's vocabulary"
        )
    return ids[0]


class PRMInput:
    """How a PRM family renders (problem, steps) into token ids and where it reads each step.

    family "cls": chat template, steps each followed by the separator (default `<extra_0>`);
    family "tag": `problem + " " + "\\n".join(step + tag)` (default tag " ки"), good/bad tokens.
    Shared by the transformers and vLLM engines.
    """

    def __init__(
        self, tokenizer: Any, family: str, *, step_token: str | None = None,
        good_token: str = "+", bad_token: str = "-", system_prompt: str = QWEN_PRM_SYSTEM,
    ):
        if family not in ("cls", "tag"):
            raise ValueError(f"PRM family must be 'cls' or 'tag', got {family!r}")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer (offset mapping) is required for PRM scoring")
        self.tokenizer, self.family, self.system_prompt = tokenizer, family, system_prompt
        self.step_token = step_token or ("<extra_0>" if family == "cls" else " ки")
        self.joiner = "" if family == "cls" else "\n"
        if family == "cls":
            self.step_token_id = single_token_id(tokenizer, self.step_token, "step token")
        else:
            self.good_id = single_token_id(tokenizer, good_token, "good token")
            self.bad_id = single_token_id(tokenizer, bad_token, "bad token")

    def clean_steps(self, steps: list[str]) -> list[str]:
        tag = self.step_token.strip() or self.step_token
        return [s.replace(tag, "") for s in steps]

    def render(self, steps: list[str], problem: str) -> tuple[str, int, bool]:
        """(text, char offset where the step block starts, add_special_tokens)."""
        block = self.joiner.join(s + self.step_token for s in steps)
        if self.family == "tag":
            head = problem + " "
            return head + block, len(head), True
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": problem},
            {"role": "assistant", "content": block},
        ]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
        else:
            text = f"{self.system_prompt}\n\n{problem}\n\n{block}"
        start = text.rfind(block) if block else len(text)
        if start < 0:
            raise ValueError("the chat template altered the step text")
        return text, start, False

    def encode(self, problem: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the rendered input and the token index of each step's tag."""
        steps = self.clean_steps(steps)
        text, block_start, special = self.render(steps, problem)
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                             verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        tag_ends, cursor = [], block_start
        for k, step in enumerate(steps):
            cursor += len(step) + len(self.step_token)
            tag_ends.append(cursor)
            cursor += len(self.joiner) if k < len(steps) - 1 else 0
        positions, t = [], 0
        for end in tag_ends:
            while t < len(offsets) and not (offsets[t][0] <= end - 1 < offsets[t][1]):
                t += 1
            if t == len(offsets):
                raise ValueError(f"step tag {self.step_token!r} not found in the tokens")
            positions.append(t)
        return ids, positions


def split_for_context(
    encoded: list[tuple[list[int], list[int]]], max_length: int
) -> tuple[list[PRMScores], list[tuple[int, list[int], list[int]]]]:
    """NaN-filled results and the (item, ids cut to max_length, tag positions) to run; rows
    longer than the context get status "truncated" (see the module docstring)."""
    results = [PRMScores([math.nan] * len(pos)) for _, pos in encoded]
    work = []
    for i, (ids, pos) in enumerate(encoded):
        if not pos:
            continue
        if len(ids) > max_length:
            results[i].status = "truncated"
            ids = ids[:max_length]
        work.append((i, ids, pos))
    return results, work


def mark_nan(results: list[PRMScores]) -> list[PRMScores]:
    for res in results:
        if res.status == "ok" and any(not math.isfinite(x) for x in res.scores):
            res.status = "nan"
    return results
