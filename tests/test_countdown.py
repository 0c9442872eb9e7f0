"""Tests for the countdown task (scope_data.tasks.countdown): process oracle, verifier, prompt
round trip, generation, the uniform oracle teacher, error injection and path diversity."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_data.diversity import path_diversity
from scope_data.tasks.arith import apply_op
from scope_data.tasks.countdown import (
    CountdownProblem,
    canonical_path,
    check_steps,
    count_solutions,
    first_error,
    generate_problems,
    gold_first_error,
    inject_error,
    is_correct,
    is_valid_solution,
    oracle_continue,
    parse_prompt,
    render,
    solutions,
)

EXAMPLE = CountdownProblem(numbers=(3, 7, 2, 9), target=4, modulus=10)
SOLUTION = "7 * 3 = 1\n2 - 9 = 3\n3 + 1 = 4\nAnswer: 4"  # 2 - 9 = -7 = 3 (mod 10)


@st.composite
def problems(draw: st.DrawFn) -> CountdownProblem:
    modulus = draw(st.integers(2, 13))
    numbers = draw(st.lists(st.integers(0, modulus - 1), min_size=1, max_size=4))
    return CountdownProblem(tuple(numbers), draw(st.integers(0, modulus - 1)), modulus)


def naive_paths(numbers: list[int], target: int, modulus: int) -> set[tuple[str, ...]]:
    """Every ordered choice of two positions and an operation, without memo or canonical moves;
    the set of canonical line sequences that end with the target."""
    if len(numbers) == 1:
        return {()} if numbers[0] == target else set()
    found = set()
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i == j:
                continue
            rest = [v for k, v in enumerate(numbers) if k not in (i, j)]
            for op in "+-*":
                c = apply_op(a, op, b, modulus)
                left, right = (max(a, b), min(a, b)) if op in "+*" else (a, b)
                for tail in naive_paths([*rest, c], target, modulus):
                    found.add((f"{left} {op} {right} = {c}", *tail))
    return found


def test_prompt_and_parse() -> None:
    assert EXAMPLE.prompt == "Mod 10. Numbers: 3 7 2 9. Target: 4."
    assert EXAMPLE.answer == "4" and EXAMPLE.num_steps == 4
    assert parse_prompt("  Mod 10. Numbers: 3 7 2 9. Target: 4.\n") == EXAMPLE
    assert parse_prompt("Mod 7. Numbers: 5. Target: 5.") == CountdownProblem((5,), 5, 7)
    with pytest.raises(ValueError, match="not a countdown prompt"):
        parse_prompt("Mod 10. Start with 1. Add 2.")
    with pytest.raises(ValueError, match="not a countdown prompt"):
        parse_prompt("Mod 10. Numbers: . Target: 4.")
    with pytest.raises(ValueError, match="value 12 outside"):
        parse_prompt("Mod 10. Numbers: 3 12. Target: 4.")
    with pytest.raises(ValueError, match="modulus"):
        CountdownProblem((1,), 0, 1)


@given(problems())
def test_parse_prompt_round_trip(problem: CountdownProblem) -> None:
    assert parse_prompt(problem.prompt) == problem


def test_process_oracle_on_hand_made_prefixes() -> None:
    assert check_steps(EXAMPLE, SOLUTION) == [True] * 4
    assert first_error(EXAMPLE, SOLUTION) == -1
    # still reachable: any correct first move that leaves the target reachable
    assert check_steps(EXAMPLE, "7 * 3 = 1") == [True]
    assert check_steps(EXAMPLE, "3 * 7 = 1\n 9 - 2 = 7") == [True, True]  # 1 - 7 = 4
    # wrong arithmetic (7 * 3 = 21 = 1), later lines continue from the mistake
    assert check_steps(EXAMPLE, "7 * 3 = 2\n2 - 9 = 3\n3 + 2 = 5\nAnswer: 5") == [False] * 4
    # unavailable number (no 5), and a number used twice (one 3 only)
    assert check_steps(EXAMPLE, "5 + 3 = 8") == [False]
    assert check_steps(EXAMPLE, "3 + 3 = 6") == [False]
    assert check_steps(EXAMPLE, "7 * 3 = 1\n7 + 2 = 9") == [True, False]  # 7 already used
    # the multiset allows a value twice when it is there twice
    twos = CountdownProblem((3, 3, 2, 9), 4, 10)
    assert check_steps(twos, "3 + 3 = 6") == [count_solutions(twos, (6, 2, 9)) > 0]
    # dead end: 7 + 3 = 0 leaves {0, 2, 9}, from which 4 cannot be made (checked by hand)
    assert naive_paths([0, 2, 9], 4, 10) == set()
    assert check_steps(EXAMPLE, "7 + 3 = 0") == [False]
    assert check_steps(EXAMPLE, "3 + 7 = 0\n9 - 2 = 7\n7 + 0 = 7\nAnswer: 7") == [False] * 4
    # an answer line too early, a wrong answer, an extra line, and a line that is not a step
    assert check_steps(EXAMPLE, "7 * 3 = 1\nAnswer: 4") == [True, False]
    assert check_steps(EXAMPLE, SOLUTION.replace("Answer: 4", "Answer: 5")) == [True] * 3 + [False]
    assert check_steps(EXAMPLE, SOLUTION + "\nAnswer: 4") == [True] * 4 + [False]
    assert check_steps(EXAMPLE, "7 times 3 is 1") == [False]
    assert check_steps(EXAMPLE, "07 * 3 = 1") == [False]
    # whitespace and blank lines are tolerated
    assert check_steps(EXAMPLE, "  7*3=1\n\n2 - 9 =  3\n3 + 1 = 4\nAnswer:4\n") == [True] * 4
    assert check_steps(EXAMPLE, "") == []


def test_first_error_and_gold_first_error() -> None:
    assert first_error(EXAMPLE, "") == 0
    assert first_error(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3") == 2  # incomplete: first missing step
    assert first_error(EXAMPLE, "7 * 3 = 1\n7 + 2 = 9") == 1
    assert first_error(EXAMPLE, SOLUTION + "\nmore") == 4
    assert gold_first_error(EXAMPLE.prompt, "7 + 3 = 0") == 0
    with pytest.raises(ValueError):
        gold_first_error("Mod 10. Start with 1. Add 2.", SOLUTION)
    # an unsolvable problem: every first step is a dead end
    assert first_error(CountdownProblem((0, 0), 1, 10), "0 + 0 = 0\nAnswer: 0") == 0


def test_verifier_checks_the_derivation() -> None:
    assert is_correct(EXAMPLE, SOLUTION) and is_valid_solution(EXAMPLE, SOLUTION)
    assert not is_correct(EXAMPLE, "Answer: 4")  # the target is in the prompt
    assert not is_correct(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3\nAnswer: 4")  # 3 and 1 left
    assert not is_correct(EXAMPLE, "7 * 3 = 2\n2 - 9 = 3\n3 + 1 = 4\nAnswer: 4")  # slip
    assert not is_correct(EXAMPLE, "7 * 3 = 1\n9 - 2 = 7\n7 - 1 = 6\nAnswer: 4")  # 6, not 4
    assert not is_correct(EXAMPLE, SOLUTION.replace("Answer: 4", "Answer: 5"))
    # chatter and trailing text are ignored by the verifier, not by the process oracle
    chatty = "Let us go.\n" + SOLUTION + "\nDone."
    assert is_correct(EXAMPLE, chatty)
    assert not is_valid_solution(EXAMPLE, chatty) and first_error(EXAMPLE, chatty) == 0
    assert is_correct(EXAMPLE, SOLUTION + "\nAnswer: 4")


def test_solutions_match_a_naive_enumeration() -> None:
    for problem in [EXAMPLE, CountdownProblem((3, 3, 2, 9), 4, 10), CountdownProblem((5, 5), 0, 10),
                    CountdownProblem((1, 2, 3), 6, 7), CountdownProblem((4,), 4, 10)]:
        expected = naive_paths(list(problem.numbers), problem.target, problem.modulus)
        got = solutions(problem)
        assert {tuple(s.line for s in path) for path in got} == expected
        assert len(got) == len(expected) == count_solutions(problem)
        for path in got:
            assert is_valid_solution(problem, render(problem, path))
    assert count_solutions(EXAMPLE) == 64
    assert count_solutions(EXAMPLE, (1, 2, 9)) == 6
    assert count_solutions(EXAMPLE, (0, 2, 9)) == 0


def test_canonical_path() -> None:
    assert canonical_path(EXAMPLE, SOLUTION) == "7 * 3 = 1; 2 - 9 = 3; 3 + 1 = 4"
    swapped = "3 * 7 = 1\n2 - 9 = 3\n1 + 3 = 4\nAnswer: 4"
    assert canonical_path(EXAMPLE, swapped) == canonical_path(EXAMPLE, SOLUTION)
    reordered = "2 - 9 = 3\n7 * 3 = 1\n3 + 1 = 4\nAnswer: 4"  # independent steps swapped
    assert canonical_path(EXAMPLE, reordered) != canonical_path(EXAMPLE, SOLUTION)
    assert canonical_path(EXAMPLE, "Answer: 4") is None


def test_generate_problems_deterministic_and_filtered() -> None:
    a = generate_problems(40, seed=3)
    assert a == generate_problems(40, seed=3)
    assert a != generate_problems(40, seed=4)
    assert generate_problems(10, seed=3) == a[:10]
    assert all(len(p.numbers) == 4 and p.modulus == 10 and count_solutions(p) >= 1 for p in a)
    hard = generate_problems(30, seed=1, min_solutions=1, max_solutions=8)
    assert all(1 <= count_solutions(p) <= 8 for p in hard)
    easy = generate_problems(30, seed=1, min_solutions=150)
    assert all(count_solutions(p) >= 150 for p in easy)
    small = generate_problems(20, seed=2, numbers=3, modulus=7)
    assert all(len(p.numbers) == 3 and p.modulus == 7 and max(p.numbers) < 7 for p in small)
    with pytest.raises(ValueError, match="min_solutions"):
        generate_problems(1, seed=0, min_solutions=5, max_solutions=4)
    with pytest.raises(ValueError, match="no problem"):
        generate_problems(1, seed=0, numbers=2, min_solutions=5)  # 4 paths at most


def test_oracle_continue_prefixes_and_errors() -> None:
    assert oracle_continue(EXAMPLE, "", rng=0) == oracle_continue(EXAMPLE, "", rng=0)
    assert oracle_continue(EXAMPLE, SOLUTION) == ""
    assert oracle_continue(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3\n3 + 1 = 4") == "\nAnswer: 4"
    assert oracle_continue(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3\n3 + 1 = 4\n") == "Answer: 4"
    assert oracle_continue(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3\n3 + 1 = 4\nAns") == "wer: 4"
    assert oracle_continue(EXAMPLE, "7 * 3 = 1\n2 - 9 = 3\n3 + 1 =") == " 4\nAnswer: 4"
    assert oracle_continue(EXAMPLE, "7 * 3 = 1\n2 - 9").startswith(" = 3\n")
    assert oracle_continue(EXAMPLE, "7 * 3 = 1").startswith("\n")
    assert not oracle_continue(EXAMPLE, "7 * 3 = 1\n").startswith("\n")
    for prefix, match in [("7 * 3 = 2\n", "step 0"), ("7 + 3 = 0\n", "step 0"),
                          ("7 + 3 = 0", "step 0"), ("7 * 3 = 1\n5 +", "step 1"),
                          ("7 * 3 = 1\n2 - 9 = 3\n3 + 1 = 4\nAnswer: 5", "step 3"),
                          (SOLUTION + "\nx", "5 steps")]:
        with pytest.raises(ValueError, match=match):
            oracle_continue(EXAMPLE, prefix)
    with pytest.raises(ValueError, match="cannot be reached"):
        oracle_continue(CountdownProblem((0, 0), 1, 10), "")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.data())
def test_oracle_continuation_of_any_prefix_is_valid(index: int, data: st.DataObject) -> None:
    problem = generate_problems(201, seed=5)[index]
    full = oracle_continue(problem, "", rng=data.draw(st.integers(0, 10**6)))
    lines = full.split("\n")
    k = data.draw(st.integers(0, len(lines)))
    prefix = "\n".join(lines[:k])
    cut = data.draw(st.sampled_from(["", "\n", "partial"]))
    if cut == "partial" and k < len(lines):
        prefix += ("\n" if k else "") + lines[k][: data.draw(st.integers(1, len(lines[k])))]
    elif cut == "\n" and k:
        prefix += "\n"
    done = prefix + oracle_continue(problem, prefix, rng=data.draw(st.integers(0, 10**6)))
    assert done.startswith(prefix)
    assert check_steps(problem, done) == [True] * problem.num_steps
    assert is_valid_solution(problem, done) and is_correct(problem, done)


def test_oracle_teacher_is_uniform_over_solutions() -> None:
    paths = Counter(canonical_path(EXAMPLE, oracle_continue(EXAMPLE, "", rng=s))
                    for s in range(3200))
    assert len(paths) == count_solutions(EXAMPLE) == 64  # every solution drawn
    assert max(paths.values()) < 2.2 * 3200 / 64 and min(paths.values()) > 0.3 * 3200 / 64
    # from a prefix: completions of "7 * 3 = 1" are its 6 solutions, about equally often
    tails = Counter(oracle_continue(EXAMPLE, "7 * 3 = 1\n", rng=s) for s in range(600))
    assert len(tails) == 6 and min(tails.values()) > 60
    # a partial line only completes into matching steps: "9 " + "- 7", "* 7", "+ 2", ...
    nexts = {oracle_continue(EXAMPLE, "9 ", rng=s).split("\n")[0] for s in range(300)}
    assert nexts == {"+ 7 = 6", "- 2 = 7", "- 3 = 6", "* 2 = 8", "+ 2 = 1", "* 7 = 3",
                     "- 7 = 2"}


def test_inject_error_kinds() -> None:
    for seed in range(50):
        for kind in ("slip", "dead_end"):
            text, j = inject_error(EXAMPLE, random.Random(seed), kind=kind)
            assert first_error(EXAMPLE, text) == j
            lines = text.split("\n")
            assert len(lines) == EXAMPLE.num_steps and lines[-1].startswith("Answer: ")
            a, op, b, _, c = lines[j].split()
            right = apply_op(int(a), op, int(b), 10) == int(c)
            assert right == (kind == "dead_end")  # a dead end is a valid move
    with pytest.raises(ValueError, match="one number"):
        inject_error(CountdownProblem((4,), 4, 10), random.Random(0))


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(0, 2**32))
def test_inject_error_first_error_matches(problem: CountdownProblem, seed: int) -> None:
    if problem.num_steps < 2 or count_solutions(problem) == 0:
        return
    text, j = inject_error(problem, random.Random(seed))
    assert 0 <= j < problem.num_steps - 1
    assert first_error(problem, text) == j
    assert not is_valid_solution(problem, text)
    assert len(text.split("\n")) == problem.num_steps


def test_path_diversity_of_teacher_groups() -> None:
    group = [oracle_continue(EXAMPLE, "", rng=s) for s in range(8)]
    paths = [p for r in group if (p := canonical_path(EXAMPLE, r)) is not None]
    div = path_diversity(paths)
    assert len(paths) == 8 and div["distinct_paths"] >= 6 and div["path_entropy"] > 2.5
    same = [canonical_path(EXAMPLE, SOLUTION)] * 4
    assert path_diversity(same) == {"distinct_paths": 1, "path_entropy": 0.0}
