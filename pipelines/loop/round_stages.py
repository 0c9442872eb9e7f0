"""How the round loop builds each stage's config from a recipe, runs it, and reads its metrics.

One function per stage turns (recipe, input table, output folder) into that stage's own config
dataclass (the object `scope <stage>` builds from its options), so a loop stage and a hand-run
stage are the same call. Recipe per-stage options are checked against the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import identity, option
from pipelines.loop.recipe import Recipe, typed_options
from scope_data.algos import get_algo


# -- generic helpers ------------------------------------------------------------------------
def make_config(cls: type, options: dict[str, Any], where: str, **fixed: Any) -> Any:
    """`cls(**fixed, **options)`; unknown option names raise ValueError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        valid = sorted(names - set(fixed))
        raise ValueError(f"recipe {where}: unknown option(s) {unknown}; valid: {', '.join(valid)}")
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ValueError(f"recipe {where}: option(s) {clash} are set by the round loop")
    options = typed_options(cls, options, f"recipe {where}")
    return cls(**{k: v for k, v in fixed.items() if k in names}, **options)


# -- policy ---------------------------------------------------------------------------------
def initial_policy(recipe: Recipe, dry_run: bool = False) -> str:
    """The round-1 policy spec; `tiny` builds (or reuses) the cached warm-started tiny model."""
    if recipe.policy != "tiny":
        return recipe.policy
    from pipelines.tiny import policy as tiny

    options = typed_options(tiny.build_tiny_policy, recipe.tiny, "recipe tiny")
    if dry_run:
        return "hf:TINY_POLICY"  # `scope tiny-policy --out TINY_POLICY` builds it
    return f"hf:{tiny.build_tiny_policy(**options)}"


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


def problems_config(entry: dict[str, Any], out: str, exclude_from: str | None = None
                    ) -> ProblemsConfig | str:
    """A ProblemsConfig for an `arith:` entry, or the table path of a `path:` entry."""
    if "path" in entry:
        return entry["path"]
    opts = dict(entry["arith"])
    return make_config(ProblemsConfig, opts, "problems", out=out, exclude_from=exclude_from)


def write_problems(cfg: ProblemsConfig) -> None:
    """Write `count` seeded arith problems, skipping prompts of `exclude_from` (held-out sets).

    Same rows as `scope problems arith` (`scope_data.problems.arith_table`) plus the exclusion.
    """
    from scope_data.problems import arith_table
    from scope_data.shards import TableStore, scan

    seen: list[str] = []
    if cfg.exclude_from:
        seen = scan(cfg.exclude_from).select("prompt").collect()["prompt"].to_list()
    table = arith_table(cfg.count, cfg.seed, tuple(cfg.steps), cfg.modulus, cfg.max_operand,
                        exclude_prompts=seen)
    TableStore(cfg.out, "problems").write(table, identity(cfg),
                                          stats={"status": {"ok": len(table)}})


# -- stages ---------------------------------------------------------------------------------
def _seed(recipe: Recipe, stage: str, r: int) -> int:
    """A per-(seed, stage, round) seed, so rounds never reuse each other's random streams."""
    from scope_data.hashing import derive_seed

    return derive_seed(recipe.seed, stage, r)


def generate_config(recipe: Recipe, problems: str, policy: str, out: str, r: int) -> Any:
    from pipelines.stages.generate import GenerateConfig

    opts = dict(recipe.generate)
    opts.setdefault("seed", _seed(recipe, "generate", r))
    if opts.get("prompts_per_round") is not None:
        opts.setdefault("prompt_seed", recipe.seed)
    return make_config(GenerateConfig, opts, "generate", problems=problems, policy=policy,
                       out=out, round=r)


def run_generate(cfg: Any) -> None:
    from pipelines.stages import generate

    _finished(generate.run(cfg), cfg.out)


def score_config(recipe: Recipe, rollouts: str, out: str) -> Any:
    from pipelines.stages.score import ScoreConfig

    opts = dict(recipe.score)
    opts.setdefault("only_failed", get_algo(recipe.algo).prm_scores == "failed")
    return make_config(ScoreConfig, opts, "score", rollouts=rollouts, out=out, prm=recipe.prm)


def run_score(cfg: Any) -> None:
    from pipelines.stages import score

    _finished(score.run(cfg), cfg.out)


def correct_config(recipe: Recipe, table: str, out: str, r: int) -> Any:
    """The correct stage of the recipe's algo over `table` (scored, or rollouts for luffy)."""
    from pipelines.stages.correct import CorrectConfig

    opts = dict(recipe.correct)
    opts.setdefault("seed", _seed(recipe, "correct", r))
    return make_config(CorrectConfig, opts, "correct", scored=table, out=out,
                       teacher=recipe.teacher, mode=get_algo(recipe.algo).correction_mode)


def run_correct(cfg: Any) -> None:
    from pipelines.stages import correct

    _finished(correct.run(cfg), cfg.out)


def train_config(recipe: Recipe, data: str, policy: str, out: str, r: int) -> Any:
    from pipelines.training.train import TrainConfig

    opts = dict(recipe.train)
    opts.setdefault("seed", _seed(recipe, "train", r))
    return make_config(TrainConfig, opts, "train", data=data, policy=policy, output_dir=out,
                       algo=recipe.algo)


SKIPPED_TRAIN = "train_skipped.json"


def run_train(cfg: Any) -> None:
    """Train; a round where every group has zero advantage keeps the old policy (recorded)."""
    from pipelines.training import train

    note = Path(cfg.output_dir).parent / SKIPPED_TRAIN
    note.unlink(missing_ok=True)
    try:
        train.run(cfg)
    except ValueError as e:
        if "zero advantage" not in str(e):
            raise
        from pipelines.console import console

        console.print(f"[yellow]train skipped:[/] {e}", highlight=False)
        note.write_text(json.dumps({"reason": str(e), "policy": cfg.policy}))


def trained_policy(cfg: Any) -> str:
    """The policy spec after a train stage (the old one when the round had nothing to train)."""
    from pipelines.engines.spec import trained_spec

    if (Path(cfg.output_dir).parent / SKIPPED_TRAIN).is_file():
        return cfg.policy
    return trained_spec(cfg.policy, cfg.output_dir)


def eval_config(recipe: Recipe, policy: str, problems: str, out: str, r: int) -> Any:
    from pipelines.stages.evaluate import EvalConfig

    opts = dict(recipe.evaluate)
    opts.setdefault("seed", _seed(recipe, "eval", 0))  # the same draws every round: paired
    return make_config(EvalConfig, opts, "evaluate", model=policy, problems=problems, out=out,
                       round=r)


def _finished(result: Any, out: str) -> None:
    if getattr(result, "manifest", None) is None:
        missing = getattr(result, "missing", [])
        raise RuntimeError(f"{out}: stage did not finish ({len(missing)} parts missing)")


# -- metrics --------------------------------------------------------------------------------
def round_metrics(recipe: Recipe, rd: Path, r: int) -> list[dict[str, Any]]:
    """One row per eval set of round r: eval metrics plus this round's training figures."""
    from pipelines.stages.evaluate import read_metrics

    base: dict[str, Any] = {"run_name": recipe.name, "algo": recipe.algo, "seed": recipe.seed,
                            "round": r}
    if r > 0:
        base.update(training_figures(rd))
    rows = []
    for entry in recipe.eval:
        m = read_metrics(str(rd / "eval" / entry["name"]))
        m.pop("config", None)
        rows.append({**base, "eval_set": entry["name"], **m})
    return rows


def training_figures(rd: Path) -> dict[str, Any]:
    """Figures of a round's training side, read back from its tables."""
    from scope_data.correction import VERIFIED_STATUSES, salvage_rate
    from scope_data.groups import rescue_counts
    from scope_data.shards import is_table, read_manifest, scan

    out: dict[str, Any] = {}
    roll = scan(str(rd / "generate"), check=False).select(
        "prompt", "task", "response_text", "correct", "problem_id").collect()
    out["train_accuracy"] = float(roll["correct"].cast(pl.Float64).mean())
    out["first_error_hist"] = first_error_hist(roll)
    failed = int((~roll["correct"]).sum())
    out["failed"] = failed
    by_problem = roll.group_by("problem_id").agg(pl.col("correct").any().alias("any"))
    out["all_failed_groups"] = int((~by_problem["any"]).sum())
    if is_table(str(rd / "correct")):
        corr = scan(str(rd / "correct"), check=False).select(
            "problem_id", "kind", "correct", "correct_status").collect()
        corrected = corr.filter(pl.col("kind") == "corrected")
        out["corrections"] = corrected.height
        verified = corrected.filter(pl.col("correct_status").is_in(VERIFIED_STATUSES)).height
        out["salvage_rate"] = salvage_rate(verified, failed)
        out["rescued_groups"] = rescue_counts(corr)["groups_rescued"]
        out["teacher_tokens"] = read_manifest(str(rd / "correct")).stats.get("teacher_tokens", 0)
    if is_table(str(rd / "score")):
        out["prm_tokens"] = read_manifest(str(rd / "score")).stats.get("prm_tokens", 0)
    train_dir = rd / "train"
    metrics = train_dir / "train_metrics.parquet"
    if metrics.is_file():
        tm = pl.read_parquet(metrics)
        summary = json.loads((train_dir / "train_manifest.json").read_text())["summary"]
        out["train_steps"] = tm.height
        out["tokens_trained"] = int(summary.get("tokens", 0))
        out["train_loss"] = float(tm["loss"].mean()) if tm.height else None
        for key in ("clip_fraction", "off_policy_share", "mean_entropy", "corrections_used",
                    "groups_trained", "groups_zero_advantage"):
            if key in summary:
                out[key] = summary[key]
    else:
        out["train_steps"] = 0
    return out


def first_error_hist(rollouts: pl.DataFrame, size: int = 10) -> list[int] | None:
    """Failed responses per first wrong step (exact checker; arith rows only), index < size."""
    from scope_data.tasks import arith

    counts: Counter[int] = Counter()
    rows = rollouts.filter((pl.col("task") == "arith") & ~pl.col("correct"))
    if rows.height == 0:
        return None
    for prompt, text in rows.select("prompt", "response_text").iter_rows():
        try:
            k = arith.gold_first_error(prompt, text)
        except ValueError:
            continue
        if k >= 0:
            counts[min(k, size - 1)] += 1
    return [counts.get(k, 0) for k in range(size)]
