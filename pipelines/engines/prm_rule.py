"""`rule:<task>`: the exact process oracle of a synthetic task as a PRM (scores 1.0 / 0.0).

`rule:arith` scores a step by :func:`scope_data.tasks.arith.check_steps` (a fast path of it),
`rule:countdown` by :func:`scope_data.tasks.countdown.check_steps` (wrong arithmetic, a number
that is not available, or a target no longer reachable), on the problem rebuilt from its prompt.
Responses of these tasks hold one step per line; a step holding several lines (another
segmentation) is correct iff all of its lines are, and a step with no text is NaN.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from pipelines.engines.base import PRMScores
from pipelines.engines.spec import EngineSpec
from scope_data.tasks import EXACT_TASKS, arith, task_module

_PROMPT_RE = re.compile(
    r"Mod (\d+)\. Start with (\d+)\.((?: (?:Add|Subtract|Multiply by) \d+\.)+)"
)
_OP_RE = re.compile(r" (Add|Subtract|Multiply by) (\d+)\.")
_SYMBOL = {word: sym for sym, word in arith.OP_WORDS.items()}


@lru_cache(maxsize=65536)
def _expected_lines(prompt: str) -> tuple[str, ...]:
    """The canonical solution lines of an arith prompt (a fast path of `arith.parse_prompt`,
    which handles, and raises for, anything the fast pattern does not cover)."""
    m = _PROMPT_RE.fullmatch(prompt.strip())
    modulus, value = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if m is None or modulus < 2 or value >= modulus:
        return tuple(arith.parse_prompt(prompt).solution_lines)
    lines = []
    for word, operand in _OP_RE.findall(m.group(3)):
        op = _SYMBOL[word]
        result = arith.apply_op(value, op, int(operand), modulus)
        lines.append(arith.step_line(value, op, int(operand), result))
        value = result
    lines.append(f"Answer: {value}")
    return tuple(lines)


@lru_cache(maxsize=65536)
def _problem(task: str, prompt: str) -> Any:
    return task_module(task).parse_prompt(prompt)  # type: ignore[union-attr]


def _score_lines(task: str, problem: str, steps: list[str]) -> list[float]:
    """Generic path: the task's `check_steps` on the steps' lines, mapped back to steps."""
    owner: list[int] = []
    lines: list[str] = []
    for k, step in enumerate(steps):
        for line in arith.response_lines(step):
            lines.append(line)
            owner.append(k)
    verdicts = task_module(task).check_steps(_problem(task, problem), "\n".join(lines))
    good = [True] * len(steps)
    for k, ok in zip(owner, verdicts, strict=True):
        good[k] = good[k] and ok
    has_text = set(owner)
    return [(1.0 if good[k] else 0.0) if k in has_text else math.nan for k in range(len(steps))]


class RulePRM:
    """Exact PRM for a synthetic task (`rule:arith`, `rule:countdown`); raises ValueError for a
    problem that is not of the task."""

    max_length = 1 << 30

    def __init__(self, spec: EngineSpec, **options: Any):
        if spec.target not in EXACT_TASKS:
            raise ValueError(f"rule PRM {spec} unknown: rule:<task> exists for "
                             f"{', '.join(EXACT_TASKS)}")
        self.spec = spec
        self.task = spec.target

    def score(self, problem: str, steps: list[str]) -> list[float]:
        return self.score_batch([(problem, steps)])[0]

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        if self.task != "arith":
            return [_score_lines(self.task, problem, steps) for problem, steps in items]
        return [self._score(problem, steps) for problem, steps in items]

    def score_batch_with_status(self, items: list[tuple[str, list[str]]]) -> list[PRMScores]:
        out = []
        for scores in self.score_batch(items):
            bad = any(math.isnan(x) for x in scores)
            out.append(PRMScores(scores, "nan" if bad else "ok"))
        return out

    @staticmethod
    def _score(problem: str, steps: list[str]) -> list[float]:
        expected = _expected_lines(problem)
        n = len(expected)
        scores: list[float] = []
        line_index = 0
        for step in steps:
            if "\n" not in step:
                text = step.strip()
                if not text:
                    scores.append(math.nan)
                    continue
                good = line_index < n and text == expected[line_index]
                line_index += 1
            else:
                lines = arith.response_lines(step)
                if not lines:
                    scores.append(math.nan)
                    continue
                good = all(
                    line_index + i < n and line == expected[line_index + i]
                    for i, line in enumerate(lines)
                )
                line_index += len(lines)
            scores.append(1.0 if good else 0.0)
        return scores
