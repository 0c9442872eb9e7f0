"""Exhaustive search over countdown states (the helper of :mod:`scope_data.tasks.countdown`).

A state is the multiset of numbers still available, kept as a sorted tuple. A move combines two
available numbers ``left op right`` (``op`` in ``+ - *``, modulo ``m``) into its result. Moves
are enumerated in canonical form: ``+`` and ``*`` put the larger operand first (``7 * 3``, not
``3 * 7``); ``-`` keeps both orders; equal values need two copies. A *solution path* is a
sequence of canonical moves that ends with the target as the last number left; two paths that
differ only in the order of independent moves are different paths.

:func:`outcomes` counts, for every final value, the paths from a state that end there (one
memoised recursion, cheap for 4-6 numbers); uniform sampling walks down the tree weighting each
move by its number of completions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import NamedTuple

from scope_data.tasks.arith import apply_op

OPS = ("+", "-", "*")
"""The operations, in enumeration order."""
COMMUTATIVE = frozenset({"+", "*"})


class Step(NamedTuple):
    """One combining step ``left op right = result`` (``result`` as written, maybe wrong)."""

    left: int
    op: str
    right: int
    result: int

    @property
    def line(self) -> str:
        """The step as a solution line, e.g. ``7 * 3 = 1``."""
        return f"{self.left} {self.op} {self.right} = {self.result}"

    @property
    def canonical(self) -> Step:
        """The same step with the operands of ``+`` and ``*`` in canonical order (larger first)."""
        if self.op in COMMUTATIVE and self.left < self.right:
            return self._replace(left=self.right, right=self.left)
        return self

    @property
    def renderings(self) -> tuple[str, ...]:
        """The lines that write this step: both operand orders for ``+`` and ``*``."""
        swapped = self._replace(left=self.right, right=self.left)
        if self.op in COMMUTATIVE and self.left != self.right:
            return (self.line, swapped.line)
        return (self.line,)


def state_of(numbers: Iterable[int]) -> tuple[int, ...]:
    """The canonical state (sorted tuple) of a multiset of numbers."""
    return tuple(sorted(numbers))


def after(state: Sequence[int], step: Step) -> tuple[int, ...] | None:
    """The state once ``step`` took its two operands and added its (written) result; None when
    an operand is not available (``3 + 3`` needs two 3s)."""
    rest = list(state)
    for operand in (step.left, step.right):
        if operand not in rest:
            return None
        rest.remove(operand)
    return state_of([*rest, step.result])


def moves(state: Sequence[int], modulus: int) -> tuple[Step, ...]:
    """Every distinct canonical move from ``state`` (with its true result), in a fixed order."""
    values = sorted(set(state))
    out = []
    for a in values:
        for b in values:
            if a == b and list(state).count(a) < 2:
                continue
            for op in OPS:
                if op in COMMUTATIVE and a < b:
                    continue
                out.append(Step(a, op, b, apply_op(a, op, b, modulus)))
    return tuple(out)


@lru_cache(maxsize=1 << 16)
def outcomes(state: tuple[int, ...], modulus: int) -> tuple[int, ...]:
    """``counts[v]``: the number of solution paths from the sorted ``state`` whose last number is
    ``v`` (a one-number state has one empty path)."""
    if len(state) == 1:
        return tuple(int(v == state[0]) for v in range(modulus))
    counts = [0] * modulus
    for step in moves(state, modulus):
        for v, c in enumerate(outcomes(after(state, step), modulus)):
            counts[v] += c
    return tuple(counts)


def count_paths(numbers: Iterable[int], target: int, modulus: int) -> int:
    """The number of solution paths that turn ``numbers`` into ``target``."""
    return outcomes(state_of(numbers), modulus)[target]


def paths(numbers: Iterable[int], target: int, modulus: int) -> Iterator[tuple[Step, ...]]:
    """Every solution path from ``numbers`` to ``target``, in the fixed move order."""
    state = state_of(numbers)
    if len(state) == 1:
        if state[0] == target:
            yield ()
        return
    for step in moves(state, modulus):
        nxt = after(state, step)
        if count_paths(nxt, target, modulus):
            for rest in paths(nxt, target, modulus):
                yield (step, *rest)


def weighted_choice(weights: Sequence[int], rng: random.Random) -> int:
    """An index drawn with probability proportional to its (integer) weight."""
    r = rng.randrange(sum(weights))
    for i, w in enumerate(weights):
        if r < w:
            return i
        r -= w
    raise AssertionError("unreachable")


def sample_path(
    numbers: Iterable[int], target: int, modulus: int, rng: random.Random
) -> tuple[Step, ...]:
    """A solution path drawn uniformly among all of them; ValueError if there is none."""
    state = state_of(numbers)
    if not count_paths(state, target, modulus):
        raise ValueError(f"target {target} cannot be reached from {list(state)} mod {modulus}")
    path: list[Step] = []
    while len(state) > 1:
        options = moves(state, modulus)
        weights = [count_paths(after(state, s), target, modulus) for s in options]
        step = options[weighted_choice(weights, rng)]
        path.append(step)
        state = after(state, step)
    return tuple(path)


def random_walk(numbers: Iterable[int], modulus: int, rng: random.Random) -> tuple[Step, ...]:
    """Uniformly random moves until one number is left (reaching any value)."""
    state = state_of(numbers)
    path: list[Step] = []
    while len(state) > 1:
        step = rng.choice(moves(state, modulus))
        path.append(step)
        state = after(state, step)
    return tuple(path)
