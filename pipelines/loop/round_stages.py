"""How the round loop builds each stage's config from a recipe, runs it, and reads its metrics.

One function per stage turns (recipe, input table, output folder) into that stage's own config
dataclass (the object `scope <stage>` builds from its options), so a loop stage and a hand-run
stage are the same call. Recipe per-stage options are checked against the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.loop.recipe import Recipe, typed_options
from scope_data.algos import get_algo


# -- generic helpers ------------------------------------------------------------------------
def make_config(cls: type, options: dict[str, Any], where: str, loop_keys: tuple[str, ...] = (),
                **fixed: Any) -> Any:
    """`cls(**fixed, **options)`; unknown option names raise ValueError listing the valid ones
    (`loop_keys`: the stage's recipe keys the loop itself reads, listed as valid too)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        valid = sorted((names - set(fixed)) | set(loop_keys))
        raise ValueError(f"recipe {where}: unknown option(s) {unknown}; valid: {', '.join(valid)}")
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ValueError(f"recipe {where}: option(s) {clash} are set by the round loop")
    options = typed_options(cls, options, f"recipe {where}")
    return cls(**{k: v for k, v in fixed.items() if k in names}, **options)


# -- stages ---------------------------------------------------------------------------------
def _executed(recipe: Recipe, options: dict[str, Any], stage: str) -> dict[str, Any]:
    """A sharded stage's recipe options with the recipe's `executor:` section as its execution
    options (the stage's own `execution:` keys win). The loop needs each table before the next
    stage, so it waits for a slurm array to end."""
    from pipelines.executors.base import executor_options

    execution = {**recipe.executor, **options.get("execution", {})}
    if not execution:
        return dict(options)
    if execution.get("executor") == "slurm":
        execution["wait"] = True
    executor_options(execution, f"recipe {stage} executor")
    return {**options, "execution": execution}


def _seed(recipe: Recipe, stage: str, r: int) -> int:
    """A per-(seed, stage, round) seed, so rounds never reuse each other's random streams."""
    from scope_data.hashing import derive_seed

    return derive_seed(recipe.seed, stage, r)


def generate_config(recipe: Recipe, problems: str, policy: str, out: str, r: int,
                    policy_version: int | None = None) -> Any:
    """Round r's GenerateConfig; `policy_version`: rounds trained into `policy` (default r-1:
    on-policy; online with staleness K, r-1-K)."""
    from pipelines.stages.generate import GenerateConfig

    opts = _executed(recipe, recipe.generate, "generate")
    opts.setdefault("seed", _seed(recipe, "generate", r))
    if opts.get("prompts_per_round") is not None:
        opts.setdefault("prompt_seed", recipe.seed)
    return make_config(GenerateConfig, opts, "generate", problems=problems, policy=policy,
                       out=out, round=r, shard_index=None,
                       policy_version=r - 1 if policy_version is None else policy_version)


def run_generate(cfg: Any) -> None:
    from pipelines.stages import generate

    _finished(generate.run(cfg), cfg)


def score_config(recipe: Recipe, rollouts: str, out: str) -> Any:
    from pipelines.stages.score import ScoreConfig

    opts = _executed(recipe, recipe.score, "score")
    opts.setdefault("only_failed", get_algo(recipe.algo).prm_scores == "failed")
    return make_config(ScoreConfig, opts, "score", rollouts=rollouts, out=out, prm=recipe.prm,
                       shard_index=None)


def run_score(cfg: Any) -> None:
    from pipelines.stages import score

    _finished(score.run(cfg), cfg)


def correct_config(recipe: Recipe, table: str, out: str, r: int) -> Any:
    """The correct stage of the recipe's algo over `table` (scored, or rollouts for luffy)."""
    from pipelines.stages.correct import CorrectConfig

    opts = _executed(recipe, recipe.correct, "correct")
    opts.setdefault("seed", _seed(recipe, "correct", r))
    return make_config(CorrectConfig, opts, "correct", scored=table, out=out,
                       teacher=recipe.teacher, mode=get_algo(recipe.algo).correction_mode,
                       shard_index=None)


def run_correct(cfg: Any) -> None:
    from pipelines.stages import correct

    _finished(correct.run(cfg), cfg)


LOOP_TRAIN_KEYS = ("carry_state", "fixed_steps_per_round")  # recipe train keys of the loop


def carry_state(recipe: Recipe) -> bool:
    """`train: {carry_state: false}`: every round starts a fresh optimizer and schedule."""
    value = recipe.train.get("carry_state", True)
    if not isinstance(value, bool):
        raise ValueError(f"recipe train: carry_state must be true or false, got {value!r}")
    return value


def train_config(recipe: Recipe, data: str, policy: str, out: str, r: int,
                 resume_from: str | None = None, rounds: int | None = None) -> Any:
    """Round r's TrainConfig; `resume_from` is the last trained round's folder (carried state).

    `fixed_steps_per_round: K` sets every round's max_steps to K (same updates for every algo).
    With carried state and a non-constant LR schedule, schedule_steps defaults to the whole
    run's steps (`schedule_estimate`)."""
    from pipelines.training.train import TrainConfig

    opts = {k: v for k, v in recipe.train.items() if k not in LOOP_TRAIN_KEYS}
    fixed = recipe.train.get("fixed_steps_per_round")
    if fixed is not None:
        if isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 1:
            raise ValueError(f"recipe train: fixed_steps_per_round must be an integer >= 1, "
                             f"got {fixed!r}")
        if "max_steps" in opts:
            raise ValueError("recipe train: give fixed_steps_per_round or max_steps, not both")
        opts["max_steps"] = fixed
    opts.setdefault("seed", _seed(recipe, "train", r))
    opts.setdefault("logging_dir", str(Path(out).parents[1] / "tracking"))  # RUN_DIR/tracking
    opts.setdefault("run_name", f"{recipe.name}-{recipe.algo}-seed{recipe.seed}")
    if isinstance(opts.get("report_to"), list):  # a YAML list: the comma list of --report-to
        opts["report_to"] = ",".join(map(str, opts["report_to"]))
    carry = carry_state(recipe)
    cfg = make_config(TrainConfig, opts, "train", LOOP_TRAIN_KEYS, data=data, policy=policy,
                      output_dir=out, algo=recipe.algo,
                      resume_from=resume_from if carry else None)
    if carry:
        if "schedule_steps" not in opts and cfg.lr_scheduler_type != "constant":
            cfg.schedule_steps = schedule_estimate(recipe, cfg, rounds or recipe.rounds)
    return cfg


def schedule_estimate(recipe: Recipe, cfg: Any, rounds: int) -> int:
    """Optimizer steps of the whole run: rounds x max_steps, else rounds x the steps of a round
    that trains every response (problems per round x n, epochs, one process). An upper bound:
    groups with zero advantage are dropped, so later rounds may end before the schedule does."""
    import math

    if cfg.max_steps > 0:
        return rounds * cfg.max_steps
    from pipelines.stages.generate import GenerateConfig

    per_round = recipe.generate.get("prompts_per_round")
    if per_round is None:
        entry = recipe.problems
        if "arith" in entry:
            per_round = int(entry["arith"]["count"])
        else:
            from scope_data.shards import scan

            per_round = scan(entry["path"]).select(pl.len()).collect().item()
    n = recipe.generate.get("n", GenerateConfig.__dataclass_fields__["n"].default)
    batches = math.ceil(per_round * n / cfg.per_device_train_batch_size)
    ga = cfg.gradient_accumulation_steps
    updates = max(batches // ga + int(batches % ga > 0), 1)
    return rounds * math.ceil(cfg.num_train_epochs * updates)


def tracker(recipe: Recipe, run_dir: Path) -> Any:
    """The run's tracker: the train stage's report_to, run_name and logging_dir (one owner)."""
    return train_config(recipe, "", "", str(run_dir / "round-0000" / "train"), 0).tracker()


SKIPPED_TRAIN = "train_skipped.json"


def run_train(cfg: Any) -> None:
    """Train; a round where every group has zero advantage keeps the old policy: its folder
    (with the trainer state it carries) is copied to the train output, recorded in
    train_skipped.json. So the policy after round r, and the state round r+1 continues, is
    always round r's train folder, and every later stage's config is known before it runs
    (online workers plan ahead of the trainer)."""
    import dataclasses
    import shutil

    from pipelines.engines.spec import trainable_path
    from pipelines.training import train
    from pipelines.training.state import has_state

    out = Path(cfg.output_dir)
    note = out.parent / SKIPPED_TRAIN
    note.unlink(missing_ok=True)
    if cfg.resume_from and not has_state(cfg.resume_from) and (
            Path(cfg.resume_from).parent / SKIPPED_TRAIN).is_file():
        cfg = dataclasses.replace(cfg, resume_from=None)  # skipped before any state existed
    try:
        train.run(cfg)
    except ValueError as e:
        if "zero advantage" not in str(e):
            raise
        from pipelines.console import console

        console.print(f"[yellow]train skipped:[/] {e}", highlight=False)
        tmp = out.parent / f".{out.name}.tmp-skip"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(trainable_path(cfg.policy), tmp, ignore=shutil.ignore_patterns(
            "train_metrics.parquet", "train_manifest.json"))
        (tmp / "train_manifest.json").write_text(json.dumps(
            {"kind": "scope-train", "skipped": str(e), "policy": cfg.policy}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        note.write_text(json.dumps({"reason": str(e), "policy": cfg.policy}))


def trained_policy(cfg: Any) -> str:
    """The policy spec after a train stage: its output folder (see `run_train`)."""
    from pipelines.engines.spec import trained_spec

    return trained_spec(cfg.policy, cfg.output_dir)


def carried_from(cfg: Any) -> str | None:
    """The train folder whose state the next round continues: this round's (a round that
    trained nothing holds a copy of the state it would have continued, see `run_train`)."""
    return cfg.output_dir


def eval_due(every: int, r: int, rounds: int) -> bool:
    """Whether an eval set with `every: K` is evaluated after round r of `rounds`: round 0, the
    last round, and every K-th round (K = 0: only the first and the last)."""
    return r in (0, rounds) or (every > 0 and r % every == 0)


def eval_config(recipe: Recipe, policy: str, problems: str, out: str, r: int) -> Any:
    from pipelines.stages.evaluate import EvalConfig

    opts = dict(recipe.evaluate)
    opts.setdefault("seed", _seed(recipe, "eval", 0))  # the same draws every round: paired
    return make_config(EvalConfig, opts, "evaluate", model=policy, problems=problems, out=out,
                       round=r)


def _finished(result: Any, cfg: Any) -> None:
    """A whole stage ends with its table; one shard of it (an online worker's share of a split
    stage; the recipe cannot set `shard_index`) may leave other parts to other workers."""
    if getattr(result, "manifest", None) is None and cfg.shard_index is None:
        missing = getattr(result, "missing", [])
        raise RuntimeError(f"{cfg.out}: stage did not finish ({len(missing)} parts missing)")


# -- metrics --------------------------------------------------------------------------------
def round_metrics(recipe: Recipe, rd: Path, r: int, rounds: int) -> list[dict[str, Any]]:
    """One row per eval set of round r: eval metrics plus this round's training figures (one
    row with a null eval_set when no set is evaluated this round)."""
    from pipelines.stages.evaluate import read_metrics

    base: dict[str, Any] = {"run_name": recipe.name, "algo": recipe.algo, "seed": recipe.seed,
                            "round": r}
    if r > 0:
        base.update(training_figures(rd))
    rows = []
    for entry in recipe.eval:
        if not eval_due(entry.get("every", 1), r, rounds):
            continue  # not evaluated this round (an older, longer run's folder is ignored)
        m = read_metrics(str(rd / "eval" / entry["name"]))
        m.pop("config", None)
        rows.append({**base, "eval_set": entry["name"], **m})
    if not rows:  # no set due this round (`every`): its training figures still get a row
        rows.append({**base, "eval_set": None})
    return rows


def batch_folder(rd: Path, k: int) -> Path:
    """Where sampling batch k of a round writes its stages (dynamic sampling; batch 1: rd)."""
    return rd if k == 1 else rd / f"batch-{k:02d}"


def training_figures(rd: Path) -> dict[str, Any]:
    """Figures of a round's training side, read back from its tables."""
    from scope_data.correction import VERIFIED_STATUSES, salvage_rate
    from scope_data.groups import rescue_counts
    from scope_data.shards import is_table, read_manifest, scan

    out: dict[str, Any] = {}
    folders = [rd]  # + the sampling batches the round's selection used (dynamic sampling)
    if is_table(str(rd / "select")):
        drawn = read_manifest(str(rd / "select")).stats.get("sampling_batches", 1)
        folders += [batch_folder(rd, k) for k in range(2, drawn + 1)]

    def stacked(stage: str, cols: list[str]) -> pl.DataFrame | None:
        found = [str(f / stage) for f in folders if is_table(str(f / stage))]
        return pl.concat([scan(u, check=False).select(cols).collect() for u in found]
                         ) if found else None

    def stat(stage: str, key: str) -> int:
        return sum(read_manifest(str(f / stage)).stats.get(key, 0) for f in folders
                   if is_table(str(f / stage)))

    roll = stacked("generate", ["prompt", "task", "response_text", "correct", "problem_id",
                                "response_token_ids", "round", "policy_version"])
    if roll is None:
        raise FileNotFoundError(f"{rd}: no generate table")
    out["rollouts"] = roll.height  # every generated response counts in the budget
    out["generated_tokens"] = int(roll["response_token_ids"].list.len().sum())
    out["sampling_batches"] = sum(is_table(str(f / "generate")) for f in folders)
    out["train_accuracy"] = float(roll["correct"].cast(pl.Float64).mean())
    # rounds the trainer is ahead of the policy that sampled the round (online K; 0 offline)
    lag = (roll["round"] - 1 - roll["policy_version"]).drop_nulls()
    out["staleness"] = int(lag.max()) if lag.len() else 0
    out["first_error_hist"] = first_error_hist(roll)
    failed = int((~roll["correct"]).sum())
    out["failed"] = failed
    by_problem = roll.group_by("problem_id").agg(pl.col("correct").any().alias("any"))
    out["all_failed_groups"] = int((~by_problem["any"]).sum())
    corr = stacked("correct", ["problem_id", "kind", "correct", "correct_status",
                               "prefix_steps"])
    if corr is not None:
        corrected = corr.filter(pl.col("kind") == "corrected")
        out["corrections"] = corrected.height
        # steps of the policy's own response kept before the teacher's suffix (luffy: 0)
        out["kept_prefix_steps"] = (float(corrected["prefix_steps"].mean())
                                    if corrected.height else None)
        verified = corrected.filter(pl.col("correct_status").is_in(VERIFIED_STATUSES)).height
        out["salvage_rate"] = salvage_rate(verified, failed)
        out["rescued_groups"] = rescue_counts(corr)["groups_rescued"]
        out["teacher_tokens"] = stat("correct", "teacher_tokens")
    if is_table(str(rd / "score")):
        out["prm_tokens"] = stat("score", "prm_tokens")
    if is_table(str(rd / "select")):
        sampled = read_manifest(str(rd / "select")).stats
        out.update({k: sampled[k] for k in ("groups_selected", "groups_short") if k in sampled})
    train_dir = rd / "train"
    metrics = train_dir / "train_metrics.parquet"
    if metrics.is_file():
        tm = pl.read_parquet(metrics)
        summary = json.loads((train_dir / "train_manifest.json").read_text())["summary"]
        out["train_steps"] = tm.height
        out["tokens_trained"] = int(summary.get("tokens", 0))
        out["train_loss"] = float(tm["loss"].mean()) if tm.height else None
        for key in ("clip_fraction", "off_policy_share", "mean_entropy", "corrections_used",
                    "groups_trained", "groups_zero_advantage", "truncated_masked",
                    "overlong_penalised"):
            if key in summary:
                out[key] = summary[key]
    else:
        out["train_steps"] = 0
    return out


def first_error_hist(rollouts: pl.DataFrame, size: int = 10) -> list[int] | None:
    """Failed responses per first wrong step (exact checker; exact-task rows only), index < size."""
    from scope_data.tasks import EXACT_TASKS, gold_first_error

    counts: Counter[int] = Counter()
    rows = rollouts.filter(pl.col("task").is_in(EXACT_TASKS) & ~pl.col("correct"))
    if rows.height == 0:
        return None
    for task, prompt, text in rows.select("task", "prompt", "response_text").iter_rows():
        try:
            k = gold_first_error(task, prompt, text)
        except ValueError:
            continue
        if k >= 0:
            counts[min(k, size - 1)] += 1
    return [counts.get(k, 0) for k in range(size)]
