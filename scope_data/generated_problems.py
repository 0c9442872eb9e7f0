"""Generated problem sets (`scope problems arith|countdown`): seeded, distinct problems of the
synthetic tasks (`scope_data.tasks`), written as a problems table. Imported through
`scope_data.problems`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from scope_data.hashing import stable_id
from scope_data.schema import schema_for
from scope_data.shards import TableStore

if TYPE_CHECKING:
    from scope_data.problems import ProblemsResult


def _distinct_table(task: str, source: str, pool: Iterable[tuple[str, str, str]], count: int,
                    seen: set[str], what: str) -> pa.Table:
    """The first `count` (prompt, answer, solution) of `pool` whose prompt is not in `seen`, as
    a problems table of `task` (`source_index`: the position in the pool)."""
    rows = []
    for i, (prompt, answer, solution) in enumerate(pool):
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"problem_id": stable_id(source, i, prompt), "source": source,
                     "source_index": i, "task": task, "prompt": prompt, "answer": answer,
                     "solution": solution})
        if len(rows) == count:
            break
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} distinct {task} problems exist for {what}; "
                         f"asked for {count}")
    return pa.Table.from_pylist(rows, schema=schema_for("problems"))


MAX_COUNT = 10_000_000  # generated problems per table


def _write_generated(out: str, table: pa.Table, config: dict[str, Any], source: str,
                     storage_options: dict[str, Any] | None) -> ProblemsResult:
    from scope_data.problems import ProblemsResult  # problems.py imports this module

    stats = {"status": {"ok": table.num_rows, "skipped_invalid": 0}}
    manifest = TableStore(out, "problems", storage_options).write(table, config, stats=stats)
    return ProblemsResult(manifest, manifest.url, source, table.num_rows, 0, config["source"])


def arith_table(
    count: int, seed: int, steps: tuple[int, int] = (3, 6), modulus: int = 10,
    max_operand: int | None = None, exclude_prompts: Iterable[str] = (),
) -> pa.Table:
    """`count` distinct seeded arith problems (none whose prompt is in `exclude_prompts`).

    Problems are drawn from `generate_problems(4 * count + 64, ...)` in order, skipping repeats;
    `source` is `arith:seed=S` and `source_index` the position in that draw.
    """
    from scope_data.tasks.arith import generate_problems

    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"--count must be in [1, {MAX_COUNT}], got {count}")
    pool = generate_problems(4 * count + 64, seed=seed, steps=steps, modulus=modulus,
                             max_operand=max_operand)
    return _distinct_table("arith", f"arith:seed={seed}",
                           ((p.prompt, p.answer, p.solution) for p in pool), count,
                           set(exclude_prompts), f"steps={steps}, modulus={modulus}")


def write_arith(
    out: str, count: int, seed: int, steps: tuple[int, int] = (3, 6), modulus: int = 10,
    max_operand: int | None = None, storage_options: dict[str, Any] | None = None,
) -> ProblemsResult:
    """Generate arith problems and write them as a problems table."""
    table = arith_table(count, seed, steps, modulus, max_operand)
    config = {"source": "arith", "count": count, "seed": seed, "steps": list(steps),
              "modulus": modulus, "max_operand": max_operand}
    return _write_generated(out, table, config, f"arith:seed={seed}", storage_options)


def countdown_table(
    count: int, seed: int, numbers: int = 4, modulus: int = 10, min_solutions: int = 1,
    max_solutions: int | None = None, exclude_prompts: Iterable[str] = (),
) -> pa.Table:
    """`count` distinct seeded countdown problems with `min_solutions..max_solutions` solution
    paths (`scope_data.tasks.countdown.generate_problems`, drawn in order, repeats skipped).

    `source` is `countdown:seed=S`; each `solution` is one solution drawn uniformly (seeded by
    the problem's position) among all of them, the task's reference for the `reference` teacher.
    """
    from scope_data.tasks import countdown as cd

    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"--count must be in [1, {MAX_COUNT}], got {count}")
    pool = cd.generate_problems(4 * count + 64, seed=seed, numbers=numbers, modulus=modulus,
                                min_solutions=min_solutions, max_solutions=max_solutions)
    source = f"countdown:seed={seed}"
    rows = ((p.prompt, p.answer, cd.oracle_continue(p, "", rng=f"{source}:{i}"))
            for i, p in enumerate(pool))
    what = (f"numbers={numbers}, modulus={modulus}, solutions {min_solutions}.."
            f"{'' if max_solutions is None else max_solutions}")
    return _distinct_table("countdown", source, rows, count, set(exclude_prompts), what)


def write_countdown(
    out: str, count: int, seed: int, numbers: int = 4, modulus: int = 10,
    min_solutions: int = 1, max_solutions: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ProblemsResult:
    """Generate countdown problems and write them as a problems table."""
    table = countdown_table(count, seed, numbers, modulus, min_solutions, max_solutions)
    config = {"source": "countdown", "count": count, "seed": seed, "numbers": numbers,
              "modulus": modulus, "min_solutions": min_solutions,
              "max_solutions": max_solutions}
    return _write_generated(out, table, config, f"countdown:seed={seed}", storage_options)
