"""Modular-arithmetic word problems: the embedded default task (DESIGN.md section 6).

A problem reads ``Mod 10. Start with 1. Subtract 7. Multiply by 7. Add 3.`` and its canonical
solution has one step per line, then the answer line::

    1 - 7 = 4
    4 * 7 = 8
    8 + 3 = 1
    Answer: 1

Steps are the non-empty lines of a response (surrounding whitespace of a line is ignored). The
exact step checker (:func:`check_steps`, the ``rule:arith`` PRM), the first-error locator, the
verifier, an oracle teacher that continues any correct prefix and an error injector for
warm-start data live here. Pure logic: no model code.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

OP_WORDS: dict[str, str] = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
"""Operation symbol -> prompt wording."""
_WORD_OPS = {word: sym for sym, word in OP_WORDS.items()}
_ANSWER_RE = re.compile(r"^\s*Answer:\s*(.*?)\s*$")
_HEAD_RE = re.compile(r"^Mod (\d+)\. Start with (\d+)\.")
_OP_RE = re.compile(r"^ (Add|Subtract|Multiply by) (\d+)\.")


def apply_op(value: int, op: str, operand: int, modulus: int) -> int:
    """Apply one operation (symbol ``+``, ``-`` or ``*``) modulo ``modulus``."""
    if op == "+":
        return (value + operand) % modulus
    if op == "-":
        return (value - operand) % modulus
    if op == "*":
        return (value * operand) % modulus
    raise ValueError(f"unknown operation {op!r}")


def step_line(value: int, op: str, operand: int, result: int) -> str:
    """One solution line, e.g. ``1 - 7 = 4``."""
    return f"{value} {op} {operand} = {result}"


@dataclass(frozen=True)
class ArithProblem:
    """A start value, a chain of ``(symbol, operand)`` operations and the modulus."""

    start: int
    ops: tuple[tuple[str, int], ...]
    modulus: int

    def __post_init__(self) -> None:
        if self.modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {self.modulus}")
        if not 0 <= self.start < self.modulus:
            raise ValueError(f"start {self.start} outside 0..{self.modulus - 1}")
        if not self.ops:
            raise ValueError("a problem needs at least one operation")
        for op, operand in self.ops:
            if op not in OP_WORDS:
                raise ValueError(f"unknown operation {op!r}")
            if operand < 0:
                raise ValueError(f"negative operand {operand}")

    @property
    def prompt(self) -> str:
        """The problem text, e.g. ``Mod 10. Start with 1. Subtract 7. Add 3.``."""
        parts = [f"Mod {self.modulus}.", f"Start with {self.start}."]
        parts += [f"{OP_WORDS[op]} {operand}." for op, operand in self.ops]
        return " ".join(parts)

    @cached_property
    def values(self) -> tuple[int, ...]:
        """Running values: the start, then the value after each operation."""
        vals = [self.start]
        for op, operand in self.ops:
            vals.append(apply_op(vals[-1], op, operand, self.modulus))
        return tuple(vals)

    @property
    def answer(self) -> str:
        """The final value as a string."""
        return str(self.values[-1])

    @property
    def solution_lines(self) -> list[str]:
        """The canonical steps: one line per operation, then ``Answer: <final>``."""
        vals = self.values
        lines = [step_line(vals[i], op, b, vals[i + 1]) for i, (op, b) in enumerate(self.ops)]
        return [*lines, f"Answer: {self.answer}"]

    @property
    def solution(self) -> str:
        """The canonical solution text (lines joined by ``\\n``, no trailing newline)."""
        return "\n".join(self.solution_lines)

    @property
    def num_steps(self) -> int:
        """Number of steps of a complete solution (operations + the answer line)."""
        return len(self.ops) + 1


def parse_prompt(prompt: str) -> ArithProblem:
    """Rebuild the problem from its prompt text; raises ValueError naming the bad text."""
    text = prompt.strip()
    head = _HEAD_RE.match(text)
    if head is None:
        raise ValueError(f"not an arith prompt (expected 'Mod N. Start with V.'): {text[:60]!r}")
    modulus, start = int(head.group(1)), int(head.group(2))
    rest = text[head.end() :]
    ops: list[tuple[str, int]] = []
    while rest:
        m = _OP_RE.match(rest)
        if m is None:
            raise ValueError(f"cannot parse arith operation at {rest[:40]!r} in {text!r}")
        ops.append((_WORD_OPS[m.group(1)], int(m.group(2))))
        rest = rest[m.end() :]
    try:
        return ArithProblem(start=start, ops=tuple(ops), modulus=modulus)
    except ValueError as exc:
        raise ValueError(f"invalid arith prompt {text!r}: {exc}") from None


MAX_STEPS = 1000  # operations per problem: bounds on generation inputs (huge values would hang)
MAX_MODULUS = 1 << 62


def generate_problems(
    count: int,
    seed: int,
    steps: tuple[int, int] = (3, 6),
    modulus: int = 10,
    max_operand: int | None = None,
) -> list[ArithProblem]:
    """``count`` seeded problems with ``steps[0]..steps[1]`` operations (inclusive).

    Start values lie in ``0..modulus-1``; operands in ``0..max_operand`` (default
    ``modulus - 1``). The same arguments always give the same list.
    """
    lo, hi = steps
    if not 1 <= lo <= hi <= MAX_STEPS:
        raise ValueError(f"steps must satisfy 1 <= min <= max <= {MAX_STEPS}, got {steps}")
    if not 2 <= modulus <= MAX_MODULUS:
        raise ValueError(f"modulus must be in [2, {MAX_MODULUS}], got {modulus}")
    top = modulus - 1 if max_operand is None else max_operand
    if top < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    rng = random.Random(f"arith:{seed}:{lo}:{hi}:{modulus}:{top}")
    symbols = list(OP_WORDS)
    problems = []
    for _ in range(count):
        n = rng.randint(lo, hi)
        ops = tuple((rng.choice(symbols), rng.randint(0, top)) for _ in range(n))
        problems.append(ArithProblem(start=rng.randrange(modulus), ops=ops, modulus=modulus))
    return problems


def response_lines(response: str) -> list[str]:
    """The steps of a response: its non-empty lines, stripped."""
    return [s for line in response.split("\n") if (s := line.strip())]


def check_steps(problem: ArithProblem, response: str) -> list[bool]:
    """One verdict per non-empty line of ``response`` (the exact ``rule:arith`` PRM).

    Line ``k < len(ops)`` is correct iff it is exactly ``{v_k} {op_k} {b_k} = {v_k+1}`` with the
    TRUE running values ``v`` of the problem: a step that is arithmetically right but continues
    from an earlier mistake is judged wrong. Line ``len(ops)`` is correct iff it is
    ``Answer: {final}``; an answer line anywhere else, and every extra line, is wrong.
    """
    expected = problem.solution_lines
    lines = response_lines(response)
    return [i < len(expected) and line == expected[i] for i, line in enumerate(lines)]


def first_error(problem: ArithProblem, response: str) -> int:
    """Index of the first wrong step; -1 if every step is right and the solution is complete.

    A response whose lines are all correct but which stops early (missing operations or the
    answer line) gets the index of the first missing step, i.e. its number of lines.
    """
    return first_error_of(check_steps(problem, response), problem.num_steps)


def first_error_of(verdicts: list[bool], num_steps: int) -> int:
    """The first False verdict; else -1 for a complete solution (`num_steps` lines), or the
    first missing step of an unfinished one. Shared by the tasks' exact checkers."""
    for i, ok in enumerate(verdicts):
        if not ok:
            return i
    return -1 if len(verdicts) == num_steps else len(verdicts)


def gold_first_error(prompt: str, response: str) -> int:
    """The exact checker's first error of a response to an arith ``prompt`` (the gold label of
    PRM evaluation and first-error histograms); ValueError if the prompt is not arith."""
    return first_error(parse_prompt(prompt), response)


def extract_answer(response: str) -> str | None:
    """The value of the last ``Answer:`` line, or None if there is none."""
    for line in reversed(response.split("\n")):
        m = _ANSWER_RE.match(line)
        if m:
            return m.group(1)
    return None


def is_correct(problem: ArithProblem, response: str) -> bool:
    """True iff the last ``Answer:`` line states the true final value."""
    return extract_answer(response) == problem.answer


def oracle_continue(problem: ArithProblem, prefix_text: str) -> str:
    """The suffix that completes a correct prefix into the canonical solution.

    ``prefix_text`` holds k >= 0 complete, correct steps (blank lines allowed), ending with or
    without a newline, possibly followed by the start of step k (a kept prefix cut inside a
    step: ``"4 * 7 = "``), which the suffix completes. ``prefix_text + suffix`` reads as the full
    solution: the suffix starts with ``\\n`` when the prefix ends after a complete line. Raises
    ValueError otherwise.
    """
    expected = problem.solution_lines
    lines = response_lines(prefix_text)
    last = prefix_text.rsplit("\n", 1)[-1].lstrip()  # text after the last newline
    partial = bool(last.strip()) and 0 < len(lines) <= len(expected) and (
        lines[-1] != expected[len(lines) - 1] and expected[len(lines) - 1].startswith(last))
    whole = lines[:-1] if partial else lines
    if len(whole) > len(expected):
        raise ValueError(f"prefix has {len(whole)} steps, the solution only {len(expected)}")
    for i, line in enumerate(whole):
        if line != expected[i]:
            raise ValueError(f"prefix step {i} is not correct: {line!r} != {expected[i]!r}")
    if partial:  # finish the started step, then the rest
        return expected[len(whole)][len(last):] + "".join(
            "\n" + line for line in expected[len(whole) + 1 :])
    rest = expected[len(whole) :]
    if not rest:
        return ""
    return ("\n" if last.strip() else "") + "\n".join(rest)


def inject_error(problem: ArithProblem, rng: random.Random) -> tuple[str, int]:
    """A solution with one wrong operation result, followed consistently.

    The step index ``j`` is drawn from ``rng``; step ``j`` states a wrong result and later
    steps (and the answer line) continue correctly from that corrupted value, like a model that
    slipped once. Returns ``(text, j)``; ``first_error(problem, text) == j``.
    """
    j = rng.randrange(len(problem.ops))
    vals = list(problem.values)
    wrong = rng.choice([v for v in range(problem.modulus) if v != vals[j + 1]])
    lines = []
    value = vals[0]
    for i, (op, operand) in enumerate(problem.ops):
        result = wrong if i == j else apply_op(value, op, operand, problem.modulus)
        lines.append(step_line(value, op, operand, result))
        value = result
    lines.append(f"Answer: {value}")
    return "\n".join(lines), j
