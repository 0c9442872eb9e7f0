"""Tests for the modular-arithmetic task (scope_data.tasks.arith)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_data.tasks.arith import (
    ArithProblem,
    apply_op,
    check_steps,
    extract_answer,
    first_error,
    generate_problems,
    inject_error,
    is_correct,
    oracle_continue,
    parse_prompt,
)

EXAMPLE = ArithProblem(start=1, ops=(("-", 7), ("*", 7), ("+", 3)), modulus=10)


@st.composite
def problems(draw: st.DrawFn) -> ArithProblem:
    modulus = draw(st.integers(2, 30))
    ops = draw(
        st.lists(
            st.tuples(st.sampled_from(["+", "-", "*"]), st.integers(0, 40)), min_size=1, max_size=8
        )
    )
    return ArithProblem(start=draw(st.integers(0, modulus - 1)), ops=tuple(ops), modulus=modulus)


def test_example_prompt_and_solution() -> None:
    assert EXAMPLE.prompt == "Mod 10. Start with 1. Subtract 7. Multiply by 7. Add 3."
    assert EXAMPLE.values == (1, 4, 8, 1)
    assert EXAMPLE.answer == "1"
    assert EXAMPLE.solution == "1 - 7 = 4\n4 * 7 = 8\n8 + 3 = 1\nAnswer: 1"
    assert EXAMPLE.num_steps == 4


def test_parse_prompt_example_and_errors() -> None:
    assert parse_prompt("Mod 10. Start with 1. Subtract 7. Multiply by 7. Add 3.") == EXAMPLE
    assert parse_prompt("  Mod 7. Start with 3. Add 12.\n") == ArithProblem(3, (("+", 12),), 7)
    with pytest.raises(ValueError, match="Divide by 2"):
        parse_prompt("Mod 10. Start with 1. Divide by 2.")
    with pytest.raises(ValueError, match="Start with 23"):
        parse_prompt("Start with 23. Add 18.")
    with pytest.raises(ValueError, match="start 12 outside"):
        parse_prompt("Mod 10. Start with 12. Add 1.")
    with pytest.raises(ValueError, match="at least one operation"):
        parse_prompt("Mod 10. Start with 1.")


def test_check_steps_judges_against_true_running_values() -> None:
    # step 0 wrong (4 -> 5); step 1 is right arithmetic from 5 but wrong against the truth
    response = "1 - 7 = 5\n5 * 7 = 5\n5 + 3 = 8\nAnswer: 8"
    assert check_steps(EXAMPLE, response) == [False, False, False, False]
    assert first_error(EXAMPLE, response) == 0
    assert not is_correct(EXAMPLE, response)
    response = "1 - 7 = 4\n\n4 * 7 = 8  \n8 + 3 = 2\nAnswer: 1"
    assert check_steps(EXAMPLE, response) == [True, True, False, True]
    assert first_error(EXAMPLE, response) == 2
    assert is_correct(EXAMPLE, response)  # the verifier only reads the answer


def test_answer_position_extra_lines_and_incomplete() -> None:
    assert check_steps(EXAMPLE, "1 - 7 = 4\nAnswer: 1") == [True, False]
    assert check_steps(EXAMPLE, EXAMPLE.solution + "\nmore") == [True] * 4 + [False]
    assert first_error(EXAMPLE, EXAMPLE.solution + "\nmore") == 4
    assert first_error(EXAMPLE, EXAMPLE.solution) == -1
    assert first_error(EXAMPLE, EXAMPLE.solution + "\n") == -1
    assert first_error(EXAMPLE, "1 - 7 = 4\n4 * 7 = 8") == 2  # missing step 2
    assert first_error(EXAMPLE, "") == 0
    assert check_steps(EXAMPLE, "") == []


def test_extract_answer() -> None:
    assert extract_answer("x\nAnswer: 3\nAnswer:  7 ") == "7"
    assert extract_answer("no answer") is None
    assert not is_correct(EXAMPLE, "1 - 7 = 4")


def test_oracle_continue_newline_join() -> None:
    sol = EXAMPLE.solution
    assert oracle_continue(EXAMPLE, "") == sol
    assert oracle_continue(EXAMPLE, "1 - 7 = 4") == "\n4 * 7 = 8\n8 + 3 = 1\nAnswer: 1"
    assert oracle_continue(EXAMPLE, "1 - 7 = 4\n") == "4 * 7 = 8\n8 + 3 = 1\nAnswer: 1"
    assert oracle_continue(EXAMPLE, sol) == ""
    with pytest.raises(ValueError, match="step 1 is not correct"):
        oracle_continue(EXAMPLE, "1 - 7 = 4\n4 * 7 = 9\n")
    # a prefix cut inside a step (a token merged across a step boundary) is completed
    assert oracle_continue(EXAMPLE, "1 - 7 = 4\n4 * 7 = ") == "8\n8 + 3 = 1\nAnswer: 1"
    assert oracle_continue(EXAMPLE, "1 - 7 =") == " 4\n4 * 7 = 8\n8 + 3 = 1\nAnswer: 1"
    with pytest.raises(ValueError, match="not correct"):
        oracle_continue(EXAMPLE, "1 - 7 = 5")
    with pytest.raises(ValueError, match="5 steps"):
        oracle_continue(EXAMPLE, sol + "\nAnswer: 1")


def test_inject_error_example() -> None:
    text, j = inject_error(EXAMPLE, random.Random(0))
    lines = text.split("\n")
    assert len(lines) == 4 and lines[-1].startswith("Answer: ")
    assert check_steps(EXAMPLE, text)[:j] == [True] * j
    assert first_error(EXAMPLE, text) == j


def test_generate_problems_deterministic_and_in_range() -> None:
    a = generate_problems(50, seed=3)
    assert a == generate_problems(50, seed=3)
    assert a != generate_problems(50, seed=4)
    assert generate_problems(10, seed=3) == a[:10]
    assert {len(p.ops) for p in a} == {3, 4, 5, 6}
    assert all(0 <= b <= 9 and 0 <= p.start <= 9 and p.modulus == 10 for p in a for _, b in p.ops)
    small = generate_problems(40, seed=1, steps=(2, 2), modulus=7, max_operand=3)
    assert all(len(p.ops) == 2 and p.modulus == 7 for p in small)
    assert max(b for p in small for _, b in p.ops) <= 3
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, steps=(4, 3))


@given(problems())
def test_parse_prompt_round_trip(problem: ArithProblem) -> None:
    assert parse_prompt(problem.prompt) == problem


@given(problems(), st.data())
def test_oracle_continuation_of_any_prefix_is_correct(problem: ArithProblem, data) -> None:
    lines = problem.solution_lines
    k = data.draw(st.integers(0, len(lines)))
    trailing_newline = data.draw(st.booleans())
    prefix = "\n".join(lines[:k]) + ("\n" if trailing_newline and k else "")
    full = prefix + oracle_continue(problem, prefix)
    assert full.rstrip("\n") == problem.solution
    assert check_steps(problem, full) == [True] * problem.num_steps
    assert first_error(problem, full) == -1
    assert is_correct(problem, full)


@settings(max_examples=200)
@given(problems(), st.integers(0, 2**32))
def test_inject_error_first_error_matches(problem: ArithProblem, seed: int) -> None:
    text, j = inject_error(problem, random.Random(seed))
    assert 0 <= j < len(problem.ops)
    assert first_error(problem, text) == j
    lines = text.split("\n")
    assert len(lines) == problem.num_steps
    # later steps follow the corrupted chain consistently
    value = problem.start
    for i, (op, b) in enumerate(problem.ops):
        lhs, rhs = lines[i].split(" = ")
        assert lhs == f"{value} {op} {b}"
        if i != j:
            assert int(rhs) == apply_op(value, op, b, problem.modulus)
        value = int(rhs)
    assert lines[-1] == f"Answer: {value}"
