"""Final-answer extraction and verification (the RLVR reward).

`extract_answer` finds a response's final answer (last ``\\boxed{}``/``\\fbox{}``, else the last
``#### X``, else the last ``Answer: X`` line). `grade` / `is_correct` compare it with the gold
answer: first a string fast path, then `math-verify` (``verify(gold, pred)``, gold first, as its
docs require: the comparison is not symmetric).

The comparison runs in `scope_data.grader_pool` with a deadline that works from any thread.

A gold answer holding a JSON array of strings (`["3", "5"]`, see `scope_data.problems`) is one
answer made of several parts, all required: the response must state as many parts (its last k
``\\boxed{}``, or its final answer split at top-level commas or semicolons) and each gold part
must equal a different stated part, in any order.

Results are cached (LRU) on ``(extracted answer, gold, timeout)``, so the G samples of a group
that share an answer are verified once.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from scope_data.grader_pool import get_pool, pool_size
from scope_data.grader_pool import shutdown_grader_pool as shutdown_grader_pool  # re-export

logger = logging.getLogger(__name__)

GradeStatus = Literal["ok", "no_answer", "grader_timeout", "grader_error"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"^[ \t]*####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_ANSWER_RE = re.compile(
    r"^[ \t>*#_-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t*]*(?:is[ \t*]*)?[:：]"
    r"[ \t*]*(\S.*?)[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response: the extracted answer, the verdict and why."""

    pred_answer: str | None
    correct: bool
    status: GradeStatus


# --------------------------------------------------------------------------- extraction


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the balanced ``{...}`` group opening at ``text[open_index]``, or None."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":  # skip escaped characters such as \{ and \}
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest_start = match.end()
        stripped = text[rest_start:].lstrip()
        if stripped.startswith("{"):
            content = _braced_content(text, len(text) - len(stripped))
        elif rest_start < len(text) and text[rest_start] == " ":
            bare = re.match(r"[^\s$]+", stripped)  # "\boxed 5$" form
            content = bare.group(0) if bare else None
        else:
            content = None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_tail_answer(answer: str) -> str:
    """Strip markdown bold, surrounding ``$`` and a trailing period from a line answer."""
    answer = answer.strip().strip("*").strip()
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.rstrip(".").strip().strip("$").strip()
    return answer


def extract_answer(text: str) -> str | None:
    """The response's final answer string, or None when it states none.

    Priority: the last complete ``\\boxed{...}``/``\\fbox{...}`` (balanced braces), else the last
    ``#### X`` line (GSM8K), else the last ``Answer: X`` line (case-insensitive; also
    ``Final Answer:``, ``**Answer:**``, ``The answer is: X``), with a trailing period and
    surrounding ``$`` stripped.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASH_RE, _ANSWER_RE):
        matches = pattern.findall(text)
        for candidate in reversed(matches):
            cleaned = _clean_tail_answer(candidate)
            if cleaned:
                return cleaned
    return None


def answer_parts(gold: str) -> list[str] | None:
    """The parts of a multi-part gold answer (a JSON array of >= 2 strings), else None."""
    if not (gold.startswith("[") and gold.endswith("]") and '"' in gold):
        return None
    try:
        parts = json.loads(gold)
    except ValueError:
        return None
    if (isinstance(parts, list) and len(parts) >= 2
            and all(isinstance(p, str) and p.strip() for p in parts)):
        return [p.strip() for p in parts]
    return None


def _split_top_level(text: str) -> list[str]:
    """`text` split at commas/semicolons outside brackets, braces and parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in ",;" and depth == 0 and text[i - 1 : i] != "\\":
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip().strip("$").strip() for p in parts if p.strip()]


def _stated_parts(text: str, k: int) -> list[str] | None:
    """The k parts a response states: its last k boxed answers, else its final answer split."""
    boxed = []
    for match in _BOX_RE.finditer(text):
        stripped = text[match.end():].lstrip()
        if stripped.startswith("{"):
            content = _braced_content(text, len(text) - len(stripped))
            if content and content.strip():
                boxed.append(content.strip())
    if len(boxed) >= k and k > 1 and len(_split_top_level(boxed[-1])) == 1:
        return boxed[-k:]
    final = extract_answer(text)
    return None if final is None else _split_top_level(final)


def _grade_parts(text: str, parts: list[str], timeout: float) -> GradeResult:
    """All gold parts must each equal a different stated part (any order)."""
    stated = _stated_parts(text, len(parts))
    if not stated:
        return GradeResult(None, False, "no_answer")
    pred = ", ".join(stated)
    if len(stated) != len(parts):
        return GradeResult(pred, False, "ok")
    unused = list(stated)
    for gold in parts:
        match = None
        for candidate in unused:
            try:
                ok, status = _grade_answer(candidate, gold, timeout)
            except _UncachedGraderError:
                return GradeResult(pred, False, "grader_error")
            if status != "ok":
                return GradeResult(pred, False, status)
            if ok:
                match = candidate
                break
        if match is None:
            return GradeResult(pred, False, "ok")
        unused.remove(match)
    return GradeResult(pred, True, "ok")


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs to one space and strip (the fast-path comparison key)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- grading


class _UncachedGraderError(Exception):
    """Raised through the cache so that a failed comparison is retried next time."""


@lru_cache(maxsize=65536)
def _grade_answer(pred_answer: str, gold: str, timeout: float) -> tuple[bool, GradeStatus]:
    """Cached verdict; verdicts and timeouts are cached, errors (maybe transient) are not."""
    if normalize_whitespace(pred_answer) == normalize_whitespace(gold):
        return True, "ok"
    outcome = get_pool().run(pred_answer, gold, timeout)
    if outcome == "grader_error":
        raise _UncachedGraderError
    if isinstance(outcome, bool):
        return outcome, "ok"
    return False, outcome


def _gold_to_str(gold_answer: object) -> str | None:
    if isinstance(gold_answer, bool):
        return None
    if isinstance(gold_answer, int | float):
        return str(gold_answer)
    if isinstance(gold_answer, str) and gold_answer.strip():
        return gold_answer.strip()
    return None


def grade(response_text: object, gold_answer: object, timeout: float = 5.0) -> GradeResult:
    """Grade one response against the gold answer; never raises.

    Status: ``ok`` (compared; ``correct`` is the verdict), ``no_answer`` (empty response or no
    extractable answer), ``grader_timeout`` (math-verify ran past ``timeout`` seconds),
    ``grader_error`` (non-string response, missing gold, or the comparison failed). A numeric
    gold (int/float) is compared as its string. Only ``ok`` rows can be correct.
    """
    try:
        gold = _gold_to_str(gold_answer)
        if not isinstance(response_text, str) or gold is None:
            return GradeResult(None, False, "grader_error")
        parts = answer_parts(gold)
        if parts is not None:
            return _grade_parts(response_text, parts, float(timeout))
        pred_answer = extract_answer(response_text)
        if pred_answer is None:
            return GradeResult(None, False, "no_answer")
        try:
            correct, status = _grade_answer(pred_answer, gold, float(timeout))
        except _UncachedGraderError:
            return GradeResult(pred_answer, False, "grader_error")
        return GradeResult(pred_answer, correct, status)
    except Exception:  # a bad row must never stop a stage
        logger.warning("grading failed", exc_info=True)
        return GradeResult(None, False, "grader_error")


def is_correct(response_text: object, gold_answer: object, timeout: float = 5.0) -> bool:
    """True when the response's final answer is mathematically equal to the gold answer."""
    return grade(response_text, gold_answer, timeout).correct


def grade_many(
    responses: list[Any], gold_answers: list[Any], timeout: float = 5.0
) -> list[GradeResult]:
    """Grade pairs concurrently, one in flight per grader worker; results in input order."""
    if len(responses) != len(gold_answers):
        raise ValueError(f"{len(responses)} responses but {len(gold_answers)} gold answers")
    with ThreadPoolExecutor(pool_size(), thread_name_prefix="scope-grade") as executor:
        return list(executor.map(lambda r, g: grade(r, g, timeout), responses, gold_answers))


def grade_response(task: str, prompt: str, answer: str, text: str) -> tuple[str | None, bool, str]:
    """(pred_answer, correct, status) of one non-empty response: the task's exact verifier for
    the synthetic tasks (``arith``, ``countdown``: `scope_data.tasks`), math-verify grading
    against ``answer`` otherwise."""
    from scope_data.tasks import task_module

    module = task_module(task)
    if module is not None:
        try:
            problem = module.parse_prompt(prompt)
        except ValueError:
            problem = None
        if problem is not None:
            return module.extract_answer(text), module.is_correct(problem, text), "ok"
    g = grade(text, answer)
    status = g.status if g.status in ("grader_timeout", "grader_error") else "ok"
    return g.pred_answer, g.correct, status
