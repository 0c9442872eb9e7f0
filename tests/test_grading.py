"""Answer extraction and math-verify grading: real MATH-500 answers, timeouts, bad input."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from scope_data.grading import (
    GradeResult,
    extract_answer,
    grade,
    grade_many,
    is_correct,
    normalize_whitespace,
)

# Comparing this with a small number runs sympy for far longer than any timeout (measured: it
# still runs after 3 s with math-verify's own timeout; without one it does not return).
PATHOLOGICAL = r"The value is \boxed{9^{9^{9^{9}}}}."
TIMEOUT_S = 1.0
SLACK_S = 4.0  # pipe round trip, process kill, a worker start-up on a busy 2-core machine


@pytest.fixture(scope="module")
def math500(shared_data: Path) -> list[dict]:
    with open(shared_data / "math500.test.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
        (r"\fbox{42}", "42"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{7} and a truncated \boxed{8", "7"),
        ("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12", "12"),
        ("#### 1,234\n", "1,234"),
        ("Start with 3. Add 2.\n3 + 2 = 5\nAnswer: 5", "5"),
        ("Answer: 5.", "5"),
        ("**Final Answer:** $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 1\nwait, no.\nAnswer: 2", "2"),
        (r"#### 3 then \boxed{4}", "4"),
        ("no answer here", None),
        ("", None),
        ("   \n ", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_gsm8k_reference_solutions(shared_data: Path) -> None:
    with open(shared_data / "gsm8k.test.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:200]
    for row in rows:
        expected = row["answer"].split("####")[-1].strip()
        assert extract_answer(row["answer"]) == expected


def test_normalize_whitespace() -> None:
    assert normalize_whitespace("  \\frac{1}{2}\n ") == "\\frac{1}{2}"
    assert normalize_whitespace("(3,\n  4)") == "(3, 4)"


# ------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\frac{1}{2}}", r"\frac12", True),
        (r"\boxed{\frac{1}{2}}", "1/3", False),
        ("#### 1,000", "1000", True),
        ("#### 72", "72", True),
        ("#### 71", "72", False),
        ("Answer: 5", "5", True),
        ("Answer: 6", "5", False),
        (r"\boxed{x = 3}", "3", True),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        (r"\boxed{42}", 42, True),
    ],
)
def test_is_correct(response: str, gold: object, expected: bool) -> None:
    assert is_correct(response, gold) is expected


def test_grade_statuses() -> None:
    assert grade("Answer: 5", "5") == GradeResult("5", True, "ok")
    assert grade("Answer: 4", "5") == GradeResult("4", False, "ok")
    assert grade("I give up", "5") == GradeResult(None, False, "no_answer")
    assert grade("", "5") == GradeResult(None, False, "no_answer")
    assert grade(None, "5") == GradeResult(None, False, "grader_error")
    assert grade("Answer: 5", None) == GradeResult(None, False, "grader_error")


@pytest.mark.parametrize("bad", [None, 123, "", b"\\boxed{5}", ["5"], "\\boxed{", "}{}{\\\\"])
def test_bad_input_is_false_without_exception(bad: object) -> None:
    assert is_correct(bad, "5") is False
    assert is_correct("\\boxed{5}", bad) is False
    assert isinstance(grade(bad, bad), GradeResult)


def test_pathological_latex_times_out() -> None:
    started = time.monotonic()
    result = grade(PATHOLOGICAL, "7", timeout=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert result == GradeResult("9^{9^{9^{9}}}", False, "grader_timeout")
    assert elapsed < TIMEOUT_S + SLACK_S
    # the killed worker is replaced: grading still works afterwards
    assert grade(r"\boxed{\frac{2}{4}}", "0.5") == GradeResult(r"\frac{2}{4}", True, "ok")


def test_pathological_latex_times_out_in_a_worker_thread() -> None:
    results: list[GradeResult] = []
    # a different gold than the test above, so the cache cannot answer
    thread = threading.Thread(target=lambda: results.append(grade(PATHOLOGICAL, "8", TIMEOUT_S)))
    started = time.monotonic()
    thread.start()
    thread.join(timeout=TIMEOUT_S + SLACK_S + 10)
    elapsed = time.monotonic() - started
    assert results == [GradeResult("9^{9^{9^{9}}}", False, "grader_timeout")]
    assert elapsed < TIMEOUT_S + SLACK_S


def test_grade_many_keeps_order_and_mixes_statuses() -> None:
    responses = ["Answer: 3", r"\boxed{\frac{6}{4}}", "nothing", None, r"\boxed{2^{10}}"]
    golds = ["3", "1.5", "1", "1", "1000"]
    results = grade_many(responses, golds)
    assert [r.correct for r in results] == [True, True, False, False, False]
    assert [r.status for r in results] == ["ok", "ok", "no_answer", "grader_error", "ok"]
    with pytest.raises(ValueError):
        grade_many(["a"], [])


# ------------------------------------------------------------------------- MATH-500


def test_math500_reference_solutions_are_correct(math500: list[dict]) -> None:
    results = grade_many([row["solution"] for row in math500], [row["answer"] for row in math500])
    failures = [
        (row["unique_id"], result.pred_answer, row["answer"], result.status)
        for row, result in zip(math500, results, strict=True)
        if not result.correct
    ]
    assert len(math500) == 500
    assert len(failures) <= 5, failures  # >= 99% (measured: 0 failures)


def test_math500_other_problems_answers_are_rejected(math500: list[dict]) -> None:
    """Grade each solution against the NEXT problem's answer (shift by one).

    Pairs whose answers are equal as strings are left out (2 of 500: both "7", both "3"). The
    rest should be rejected; math-verify may legitimately accept a few that are equivalent
    (measured: 1, "5" against gold "x=5", where math-verify reads the assignment as its value).
    """
    shifted = [math500[(i + 1) % len(math500)]["answer"] for i in range(len(math500))]
    pairs = [
        (row["solution"], other)
        for row, other in zip(math500, shifted, strict=True)
        if normalize_whitespace(row["answer"]) != normalize_whitespace(other)
    ]
    results = grade_many([p[0] for p in pairs], [p[1] for p in pairs])
    accepted = [(r.pred_answer, gold) for r, (_, gold) in zip(results, pairs, strict=True)
                if r.correct]
    assert len(pairs) == 498
    assert sum(r.status == "ok" for r in results) >= 0.99 * len(pairs)
    assert len(pairs) - len(accepted) >= 0.98 * len(pairs), accepted
