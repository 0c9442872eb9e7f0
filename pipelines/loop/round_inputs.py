"""The inputs of a run: the round-1 policy and the problem sets a recipe names or generates.

`initial_policy` resolves the recipe's `policy` (an engine spec, or `tiny`: the cached
warm-started tiny model of the task named in `tiny:`); `problems_config` + `write_problems` turn
a recipe problem entry (`path:`, `arith:` or `countdown:`) into a table, with the same rows as
`scope problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import identity, option
from pipelines.loop.recipe import Recipe, typed_options
from pipelines.loop.round_stages import make_config


# -- policy ---------------------------------------------------------------------------------
def initial_policy(recipe: Recipe, dry_run: bool = False) -> str:
    """The round-1 policy spec; `tiny` builds (or reuses) the cached warm-started tiny model."""
    if recipe.policy != "tiny":
        return recipe.policy
    from pipelines.tiny import policy as tiny

    fields = dict(recipe.tiny)
    if fields.pop("task", "arith") == "countdown":
        from pipelines.tiny.countdown import CountdownTinyConfig, build_tiny_countdown_policy

        build = build_tiny_countdown_policy
        options = typed_options(CountdownTinyConfig, fields, "recipe tiny")
    else:
        build = tiny.build_tiny_policy
        options = typed_options(build, fields, "recipe tiny")
    if dry_run:
        return "hf:TINY_POLICY"  # `scope tiny-policy --out TINY_POLICY` builds it
    return f"hf:{build(**options)}"


# -- problems -------------------------------------------------------------------------------
@dataclass
class ProblemsConfig:
    """Generated arith problems (the `scope problems arith` options)."""

    out: str = option(help="output table folder (path or URL)", identity=False)
    count: int = option(help="arith: number of problems")
    seed: int = option(help="arith: generator seed")
    steps: tuple[int, int] = option((3, 6), sep="-",
                                    help="arith: operations per problem, e.g. 3-6")
    modulus: int = option(10, help="arith: modulus")
    max_operand: int | None = option(None, cli=False, help="largest operand")
    exclude_from: str | None = option(None, cli=False,
                                      help="a problems table whose prompts must not appear")


@dataclass
class CountdownProblemsConfig:
    """Generated countdown problems (the `scope problems countdown` options)."""

    out: str = option(help="output table folder (path or URL)", identity=False)
    count: int = option(help="countdown: number of problems")
    seed: int = option(help="countdown: generator seed")
    numbers: int = option(4, help="countdown: numbers per problem")
    modulus: int = option(10, help="countdown: modulus")
    min_solutions: int = option(1, help="countdown: fewest solution paths (difficulty)")
    max_solutions: int | None = option(None, help="countdown: most solution paths")
    exclude_from: str | None = option(None, cli=False,
                                      help="a problems table whose prompts must not appear")


def problems_config(entry: dict[str, Any], out: str, exclude_from: str | None = None
                    ) -> ProblemsConfig | CountdownProblemsConfig | str:
    """The config of an `arith:` or `countdown:` entry, or the table path of a `path:` entry."""
    if "path" in entry:
        return entry["path"]
    if "countdown" in entry:
        return make_config(CountdownProblemsConfig, dict(entry["countdown"]), "problems",
                           out=out, exclude_from=exclude_from)
    opts = dict(entry["arith"])
    return make_config(ProblemsConfig, opts, "problems", out=out, exclude_from=exclude_from)


def write_problems(cfg: ProblemsConfig | CountdownProblemsConfig) -> None:
    """Write `count` seeded problems, skipping prompts of `exclude_from` (held-out sets).

    Same rows as `scope problems arith|countdown` (`scope_data.problems.arith_table`,
    `countdown_table`) plus the exclusion.
    """
    from scope_data.problems import arith_table, countdown_table
    from scope_data.shards import TableStore, scan

    seen: list[str] = []
    if cfg.exclude_from:
        seen = scan(cfg.exclude_from).select("prompt").collect()["prompt"].to_list()
    if isinstance(cfg, CountdownProblemsConfig):
        table = countdown_table(cfg.count, cfg.seed, cfg.numbers, cfg.modulus,
                                cfg.min_solutions, cfg.max_solutions, exclude_prompts=seen)
    else:
        table = arith_table(cfg.count, cfg.seed, tuple(cfg.steps), cfg.modulus,
                            cfg.max_operand, exclude_prompts=seen)
    TableStore(cfg.out, "problems").write(table, identity(cfg),
                                          stats={"status": {"ok": len(table)}})


def share_round0(src: Path, dst: Path) -> None:
    """Copy `problems/` and `round-0000/` of run `src` into run `dst` (runs that differ only
    after round 0, e.g. the algorithms of one seed: same stage hashes, so `dst` resumes them)."""
    import shutil

    for name in ("problems", "round-0000"):
        if (src / name).is_dir() and not (dst / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / name, dst / name)
