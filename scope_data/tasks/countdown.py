"""Countdown modulo m: combine a few numbers into a target, a world with many right answers.

A problem reads ``Mod 10. Numbers: 3 7 2 9. Target: 4.`` (the numbers in their given order,
each in ``0..m-1``). A step combines two available numbers into one, one step per line; after
``len(numbers) - 1`` steps every number has been used exactly once and the one number left must
be the target; the answer line follows::

    7 * 3 = 1
    2 - 9 = 3
    3 + 1 = 4
    Answer: 4

Steps are the non-empty lines of a response, stripped (the ``newline`` split mode); a step line
is ``a op b = c`` with ``op`` in ``+ - *`` (spaces around the tokens optional, numbers written
without leading zeros) and an answer line is ``Answer: N``. Many step sequences solve a
problem: :func:`solutions` lists them in canonical form (see
:mod:`scope_data.tasks.countdown_search`), :func:`count_solutions` counts them, and
``generate_problems(min_solutions=, max_solutions=)`` sets the difficulty with that count.

The verifier (:func:`is_correct`, the reward) checks the derivation, not just the answer line:
the target is printed in the prompt, so ``Answer: <target>`` alone would earn the reward.
The exact process oracle (:func:`check_steps`, the future ``rule:countdown`` PRM) judges each
step, including whether the target is still reachable. The oracle teacher
(:func:`oracle_continue`) completes a correct prefix with a completion drawn uniformly among all
of them. Pure logic: no model code.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from scope_data.tasks.arith import apply_op, extract_answer, first_error_of, response_lines
from scope_data.tasks.countdown_search import (
    Step,
    after,
    count_paths,
    moves,
    paths,
    random_walk,
    sample_path,
    state_of,
    weighted_choice,
)

_PROMPT_RE = re.compile(r"^Mod (\d+)\. Numbers:((?: \d+)+)\. Target: (\d+)\.$")
_NUM = r"(0|[1-9]\d*)"
_STEP_RE = re.compile(rf"^{_NUM}\s*([-+*])\s*{_NUM}\s*=\s*{_NUM}$")
_ANSWER_LINE_RE = re.compile(r"^Answer:\s*(.*)$")
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class CountdownProblem:
    """The numbers to combine (in prompt order), the target and the modulus."""

    numbers: tuple[int, ...]
    target: int
    modulus: int

    def __post_init__(self) -> None:
        if self.modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {self.modulus}")
        if not self.numbers:
            raise ValueError("a problem needs at least one number")
        for v in (*self.numbers, self.target):
            if not 0 <= v < self.modulus:
                raise ValueError(f"value {v} outside 0..{self.modulus - 1}")

    @property
    def prompt(self) -> str:
        """The problem text, e.g. ``Mod 10. Numbers: 3 7 2 9. Target: 4.``."""
        nums = " ".join(map(str, self.numbers))
        return f"Mod {self.modulus}. Numbers: {nums}. Target: {self.target}."

    @property
    def answer(self) -> str:
        """The target as a string."""
        return str(self.target)

    @property
    def num_steps(self) -> int:
        """Number of steps of a complete solution (combining steps + the answer line)."""
        return len(self.numbers)


def parse_prompt(prompt: str) -> CountdownProblem:
    """Rebuild the problem from its prompt text; raises ValueError naming the bad text."""
    text = prompt.strip()
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(
            f"not a countdown prompt (expected 'Mod M. Numbers: a b c. Target: T.'): {text[:60]!r}"
        )
    numbers = tuple(int(v) for v in m.group(2).split())
    try:
        return CountdownProblem(numbers=numbers, target=int(m.group(3)), modulus=int(m.group(1)))
    except ValueError as exc:
        raise ValueError(f"invalid countdown prompt {text!r}: {exc}") from None


def count_solutions(problem: CountdownProblem, numbers: tuple[int, ...] | None = None) -> int:
    """The number of canonical solution paths from ``numbers`` (default: the problem's)."""
    return count_paths(problem.numbers if numbers is None else numbers, problem.target,
                       problem.modulus)


def solutions(
    problem: CountdownProblem, numbers: tuple[int, ...] | None = None
) -> list[tuple[Step, ...]]:
    """All canonical solution paths from ``numbers`` (default: the problem's), in a fixed order.
    1,152 paths at most for 4 numbers; the count grows fast beyond (use count_solutions)."""
    return list(paths(problem.numbers if numbers is None else numbers, problem.target,
                      problem.modulus))


def generate_problems(
    count: int,
    seed: int,
    numbers: int = 4,
    modulus: int = 10,
    min_solutions: int = 1,
    max_solutions: int | None = None,
) -> list[CountdownProblem]:
    """``count`` seeded problems of ``numbers`` values in ``0..modulus-1`` whose target has
    ``min_solutions..max_solutions`` solution paths (inclusive; None: no upper bound).

    Each problem draws its numbers, then a target uniformly among the values with an accepted
    number of solutions (redrawing the numbers if none has). ``min_solutions >= 1`` guarantees
    a reachable target. The same arguments always give the same list, and a shorter ``count``
    its prefix. ValueError if no problem qualifies in 10,000 draws.
    """
    if numbers < 1 or modulus < 2:
        raise ValueError(f"need numbers >= 1 and modulus >= 2, got {numbers}, {modulus}")
    lo, hi = min_solutions, max_solutions
    if lo < 1 or (hi is not None and hi < lo):
        raise ValueError(f"need 1 <= min_solutions <= max_solutions, got {lo}, {hi}")
    top = float("inf") if hi is None else hi
    rng = random.Random(f"countdown:{seed}:{numbers}:{modulus}:{lo}:{hi}")
    problems = []
    for _ in range(count):
        for _draw in range(_MAX_DRAWS):
            nums = tuple(rng.randrange(modulus) for _ in range(numbers))
            targets = [t for t in range(modulus) if lo <= count_paths(nums, t, modulus) <= top]
            if targets:
                break
        else:
            raise ValueError(f"no problem with {lo}..{hi} solutions in {_MAX_DRAWS} "
                             f"draws ({numbers} numbers mod {modulus})")
        problems.append(CountdownProblem(nums, rng.choice(targets), modulus))
    return problems


def parse_step(line: str) -> Step | None:
    """The step a (stripped) line writes, or None if it is not a step line."""
    m = _STEP_RE.match(line)
    if m is None:
        return None
    return Step(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)))


def _answer_of(line: str) -> str | None:
    m = _ANSWER_LINE_RE.match(line)
    return m.group(1).strip() if m else None


def check_steps(problem: CountdownProblem, response: str) -> list[bool]:
    """One verdict per non-empty line of ``response`` (the exact process oracle).

    Line ``k < len(numbers) - 1`` is correct iff it is a step line whose operands are available
    (multiset: ``3 + 3`` needs two 3s), whose result is right modulo m, and after which the
    target can still be reached from the numbers left. Line ``len(numbers) - 1`` is correct iff
    it is ``Answer: <target>`` and the one number left is the target. Once a line is wrong,
    every later line is wrong (it continues from a mistake), and so is every extra line.
    """
    state = state_of(problem.numbers)
    last = problem.num_steps - 1
    verdicts: list[bool] = []
    ok = True
    for i, line in enumerate(response_lines(response)):
        if ok and i < last:
            step = parse_step(line)
            nxt = None if step is None else after(state, step)
            ok = (nxt is not None
                  and step.result == apply_op(step.left, step.op, step.right, problem.modulus)
                  and count_paths(nxt, problem.target, problem.modulus) > 0)
            state = nxt
        elif ok:
            ok = i == last and _answer_of(line) == problem.answer and state == (problem.target,)
        verdicts.append(ok)
    return verdicts


def first_error(problem: CountdownProblem, response: str) -> int:
    """Index of the first wrong step; -1 if every step is right and the solution is complete.

    A response whose lines are all correct but which stops early (missing steps or the answer
    line) gets the index of the first missing step, i.e. its number of lines.
    """
    return first_error_of(check_steps(problem, response), problem.num_steps)


def gold_first_error(prompt: str, response: str) -> int:
    """The process oracle's first error of a response to a countdown ``prompt``; ValueError if
    the prompt is not countdown."""
    return first_error(parse_prompt(prompt), response)


def is_valid_solution(problem: CountdownProblem, response: str) -> bool:
    """True iff every line is right and the solution is complete, with nothing after it."""
    return first_error(problem, response) == -1


def derivation(response: str) -> list[Step]:
    """The step lines before the last ``Answer:`` line (all of them if there is none); other
    lines are skipped."""
    lines = response_lines(response)
    ends = [i for i, line in enumerate(lines) if _answer_of(line) is not None]
    body = lines[: ends[-1]] if ends else lines
    return [step for line in body if (step := parse_step(line)) is not None]


def is_correct(problem: CountdownProblem, response: str) -> bool:
    """The verifier (the reward): the last ``Answer:`` line states the target AND the step lines
    before it are a valid derivation: each uses available numbers with the right result and,
    in the end, every number is used once and the target is the one number left. Lines that
    are not steps are ignored (unlike :func:`check_steps`)."""
    if extract_answer(response) != problem.answer:
        return False
    state: tuple[int, ...] | None = state_of(problem.numbers)
    for step in derivation(response):
        if step.result != apply_op(step.left, step.op, step.right, problem.modulus):
            return False
        if (state := after(state, step)) is None:
            return False
    return state == (problem.target,)


def canonical_path(problem: CountdownProblem, response: str) -> str | None:
    """The solution path of a correct response, its steps canonical (``+``/``*`` with the larger
    operand first) and joined by ``"; "``, e.g. ``7 * 3 = 1; 2 - 9 = 3; 3 + 1 = 4``; None when
    the response is not correct. Equal strings are the same path (for diversity counts)."""
    if not is_correct(problem, response):
        return None
    return "; ".join(step.canonical.line for step in derivation(response))


def render(problem: CountdownProblem, path: tuple[Step, ...]) -> str:
    """The text of a complete path: its step lines, then ``Answer: <the number left>``."""
    state = state_of(problem.numbers)
    for step in path:
        state = after(state, step)
    return "\n".join([*(s.line for s in path), f"Answer: {state[0]}"])


def _rng(rng: random.Random | int | str) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def oracle_continue(
    problem: CountdownProblem, prefix_text: str, rng: random.Random | int | str = 0
) -> str:
    """A suffix that completes a correct prefix into a solution, drawn uniformly (seeded by
    ``rng``: a Random, or a seed) among all canonical completions.

    ``prefix_text`` holds k >= 0 complete, correct steps (blank lines allowed), ending with or
    without a newline; ``prefix_text + suffix`` is a valid solution and the suffix starts with
    ``\\n`` when the prefix ends with a complete line and no newline. An incomplete last line
    (``7 * `` or ``Answ``) is finished first: the completion is then uniform among those whose
    next line starts with it. Raises ValueError when the prefix is not correct or is too long.
    """
    rng = _rng(rng)
    lines = response_lines(prefix_text)
    if len(lines) > problem.num_steps:
        raise ValueError(f"prefix has {len(lines)} steps, a solution only {problem.num_steps}")
    verdicts = check_steps(problem, prefix_text)
    ends_open = bool(prefix_text.rsplit("\n", 1)[-1].strip())
    partial = ""
    if not all(verdicts):
        bad = verdicts.index(False)
        if not (ends_open and bad == len(lines) - 1):
            raise ValueError(f"prefix step {bad} is not correct: {lines[bad]!r}")
        lines.pop()
        partial = prefix_text.rsplit("\n", 1)[-1].lstrip()
    state = state_of(problem.numbers)
    for line in lines[: problem.num_steps - 1]:
        state = after(state, parse_step(line))
    answer = f"Answer: {problem.target}"
    rest: list[str] = []
    if len(lines) < problem.num_steps - 1:
        if partial:  # the next step: uniform among completions whose line starts with it
            options = [(text, step) for step in moves(state, problem.modulus)
                       for text in step.renderings if text.startswith(partial)]
            weights = [count_paths(after(state, s), problem.target, problem.modulus)
                       for _, s in options]
            if not any(weights):
                raise ValueError(f"prefix step {len(lines)} is not correct: {partial!r}")
            text, step = options[weighted_choice(weights, rng)]
            rest.append(text)
            state = after(state, step)
        rest += [s.line for s in sample_path(state, problem.target, problem.modulus, rng)]
    if len(lines) < problem.num_steps:
        rest.append(answer)
    if partial:
        if len(lines) == problem.num_steps - 1 and not answer.startswith(partial):
            raise ValueError(f"prefix step {len(lines)} is not correct: {partial!r}")
        return "\n".join(rest)[len(partial):]
    if not rest:
        return ""
    return ("\n" if ends_open else "") + "\n".join(rest)


def inject_error(
    problem: CountdownProblem, rng: random.Random, kind: str | None = None
) -> tuple[str, int]:
    """A solution with one wrong step ``j``, then continued consistently; returns ``(text, j)``
    with ``first_error(problem, text) == j``.

    ``kind`` (drawn from ``rng`` when None): ``"slip"``, a wrong result at step ``j``, or
    ``"dead_end"``, a valid move after which the target is unreachable (a slip when the path
    has none). Steps before ``j`` follow a uniformly drawn solution; after ``j`` the text solves
    from the corrupted numbers if it can, else makes random moves, and answers with the number
    left. ValueError when the problem has no step or no solution.
    """
    if problem.num_steps < 2:
        raise ValueError("a problem with one number has no step to corrupt")
    if kind not in (None, "slip", "dead_end"):
        raise ValueError(f"kind must be 'slip' or 'dead_end', got {kind!r}")
    m, target = problem.modulus, problem.target
    path = sample_path(problem.numbers, target, m, rng)
    states = [state_of(problem.numbers)]
    for step in path:
        states.append(after(states[-1], step))
    kind = kind or rng.choice(("slip", "dead_end"))
    dead = [[s for s in moves(states[i], m) if not count_paths(after(states[i], s), target, m)]
            for i in range(len(path))]
    if kind == "dead_end" and any(dead):
        j = rng.choice([i for i, d in enumerate(dead) if d])
        bad = rng.choice(dead[j])
    else:
        j = rng.randrange(len(path))
        bad = path[j]._replace(result=rng.choice([v for v in range(m) if v != path[j].result]))
    state = after(states[j], bad)
    tail = (sample_path(state, target, m, rng) if count_paths(state, target, m)
            else random_walk(state, m, rng))
    return render(problem, (*path[:j], bad, *tail)), j
