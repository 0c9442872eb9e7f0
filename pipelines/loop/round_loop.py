"""`scope run RECIPE --out RUN_DIR`: the round loop (DESIGN.md section 1, step 7).

Layout of a run folder::

    RUN_DIR/recipe.json                  the resolved recipe
    RUN_DIR/problems/train/              problems table (training)
    RUN_DIR/problems/<eval name>/        problems table per held-out set
    RUN_DIR/round-0000/eval/<name>/      evaluation of the initial policy
    RUN_DIR/round-XXXX/generate/         rollouts of the policy of round XXXX-1
    RUN_DIR/round-XXXX/score/            scored table          (algos that use the PRM)
    RUN_DIR/round-XXXX/correct/          corrected table       (algos that use corrections)
    RUN_DIR/round-XXXX/batch-KK/<stage>/ sampling batch KK >= 2, and
    RUN_DIR/round-XXXX/select/           the trained groups   (dynamic sampling: loop/sampling.py)
    RUN_DIR/round-XXXX/train/            new checkpoint + train_metrics.parquet
    RUN_DIR/round-XXXX/eval/<name>/      evaluation of the new checkpoint
    RUN_DIR/round-XXXX/_stages/<s>.json  completion marker: the stage's config hash
    RUN_DIR/metrics.parquet              one row per (round, eval set), rebuilt after each round
    RUN_DIR/tracking/                    tracker run of train.report_to (round_tracking.py)

A stage's hash covers its own config and the hashes of the stages it reads, so `--resume` skips
a stage whose marker holds the same hash, and a changed option reruns that stage and everything
downstream of it. Inside a stage, the shard store skips finished part files. Every stage is the
same `run(cfg)` the CLI calls; `--dry-run` returns the plan (stage, config) that
`scope run --dry-run` prints as the equivalent `scope <stage>` commands.

Algorithms share one code path and one budget (problems, n samples, seeds, train options); the
registry `scope_data.algos` says which stages each runs: `grpo` trains on the rollouts (no PRM,
no teacher), `prm_dense` scores every response and trains on the scored table (dense step
rewards), `luffy` corrects the rollouts (`--mode luffy`: whole teacher solutions, no PRM) and
`scope` scores the failed ones and corrects them (`--mode scope`: teacher suffix after the PRM's
first error); both train on the corrected table. A round whose groups all have zero advantage
trains nothing and keeps the policy (copied into its train folder; recorded in
`round-XXXX/train_skipped.json`). `--online` runs the same plan as worker processes
(`pipelines.loop.online`).
Each round's trainer continues the optimizer, LR schedule, RNG and step count of the round
before (`resume_from`; `train: {carry_state: false}` starts each round afresh; see
docs/training.md, "Resume and carried state").
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import option, storage_options_field
from pipelines.executors.base import EXECUTION_HELP, LoopExecutorOptions
from pipelines.loop import round_inputs as inputs
from pipelines.loop import round_stages as stages
from pipelines.loop.recipe import Recipe, load_recipe
from pipelines.loop.round_tracking import log_round
from pipelines.loop.runner import StageRunner
from scope_data.algos import get_algo
from scope_data.hashing import config_hash

METRICS_FILE = "metrics.parquet"
# what a run folder holds (anything else is someone else's: `scope run` refuses the folder)
RUN_ENTRY = re.compile(r"recipe\.json|metrics\.parquet|\.metrics\.parquet\.tmp|problems|"
                       r"round-\d{4}|logs|tracking|\.train\.lock")


@dataclass
class RunConfig:
    """Options of `scope run`."""

    recipe: str | Recipe = option(
        argument=True, help="recipe YAML file, or a bundled recipe name (arith-tiny, "
        "qwen2.5-math-7b)")
    out: str = option(help="run folder (round-XXXX/<stage>/, metrics.parquet)")
    rounds: int | None = option(None, help="rounds (default: the recipe's)")
    resume: bool = option(False, help="continue a run: skip stages done with the same config")
    dry_run: bool = option(False,
                           help="print the equivalent `scope <stage>` commands, run nothing")
    overrides: dict[str, Any] = option(default_factory=dict, cli=False,
                                       help="recipe keys to override (`scope run --algo/--seed`)")
    verbose: bool = option(True, cli=False, help="print every stage's summary")
    online: bool = option(False, help="run the stages as warm worker processes (one per role; "
                          "see `scope worker`)")
    max_staleness: int = option(0, help="online: round r generates with the policy of round "
                                "r-1-K (0: strictly on-policy, the offline loop's tables)")
    online_workers: dict[str, int] = option(
        default_factory=dict, identity=False, help="online: worker processes of a role as JSON, "
        "e.g. '{\"generate\": 2}': they split each of its stages by shard (generate, score, "
        "correct; each stage's num_shards >= the count)")
    execution: dict[str, Any] = option(default_factory=dict, expand=LoopExecutorOptions,
                                       identity=False, help=EXECUTION_HELP)
    storage_options: dict[str, Any] | None = storage_options_field()  # --online, --out s3://...


@dataclass
class RunResult:
    run_dir: str
    metrics: pl.DataFrame
    plan: list[tuple[str, Any]]  # (stage kind, its config) in run order; `scope run --dry-run`
    ran: list[str]               # prints them as `scope <stage>` commands
    skipped: list[str]
    launch: dict[str, str] = field(default_factory=dict)  # the recipe's launcher prefixes
    workers: dict[str, Any] = field(default_factory=dict)  # online: role -> restarts, log
    seconds: float = 0.0


def round_dir(run_dir: str | Path, r: int) -> Path:
    return Path(run_dir) / f"round-{r:04d}"


def run(cfg: RunConfig, runner: StageRunner | None = None, max_staleness: int = 0) -> RunResult:
    """Run (or resume, or print) every round of a recipe; return the metrics table.

    `runner`: an online worker's role-filtered runner (`pipelines.loop.online`), which also
    sets `max_staleness` K: round r then generates with the policy of round r-1-K (K = 0: the
    offline loop, strictly on-policy)."""
    if cfg.online_workers and not cfg.online:
        raise ValueError("--online-workers needs --online")
    if cfg.online and runner is None and not cfg.dry_run:
        from pipelines.loop.online_launch import launch

        return launch(cfg)
    recipe, rounds = resolve_rounds(cfg)
    run_dir = Path(cfg.out).expanduser().resolve()
    if runner is None:
        if not cfg.dry_run:
            # every stage's config of every round is built and checked first: a bad option fails
            # the run before its first stage writes anything
            run(dataclasses.replace(cfg, recipe=recipe, dry_run=True))
            _check_run_dir(run_dir, recipe, cfg.resume)
            stages.tracker(recipe, run_dir)  # an unknown or missing tracker fails before a stage
        runner = StageRunner(run_dir, cfg.resume, cfg.dry_run, cfg.verbose)
    policy = inputs.initial_policy(recipe, dry_run=cfg.dry_run)

    # problems
    problem_hashes: dict[str, str] = {}
    train_problems, problem_hashes["train"] = _problems(
        runner, recipe.problems, run_dir / "problems" / "train", None, [])
    eval_sets: dict[str, str] = {}
    for entry in recipe.eval:
        eval_sets[entry["name"]], problem_hashes[entry["name"]] = _problems(
            runner, entry, run_dir / "problems" / entry["name"], train_problems,
            [problem_hashes["train"]])

    # round 0: the initial policy
    policy_hash = config_hash({"policy": policy})
    history = [(policy, policy_hash)]  # the policy after each round
    writes_metrics = not cfg.dry_run and runner.role in (None, "eval")
    _evaluate(runner, recipe, run_dir, (0, rounds), policy, policy_hash, eval_sets,
              problem_hashes)
    if writes_metrics:
        _write_metrics(run_dir, recipe, 0, rounds)
    carried: str | None = None  # the train folder whose state the next round continues
    for r in range(1, rounds + 1):
        version = max(0, r - 1 - max_staleness)  # rounds trained into the sampling policy
        behaviour = (*history[version], version)
        policy, policy_hash, carried = _round(runner, recipe, run_dir, r, history[-1], behaviour,
                                              train_problems, problem_hashes, carried, rounds)
        history.append((policy, policy_hash))
        _evaluate(runner, recipe, run_dir, (r, rounds), policy, policy_hash, eval_sets,
                  problem_hashes)
        if writes_metrics:
            runner.settle(policy_hash)  # a round without evaluation has no stage that waited
            _write_metrics(run_dir, recipe, r, rounds)
    if cfg.dry_run:
        return RunResult(str(run_dir), pl.DataFrame(), runner.plan, [], [], recipe.launch)
    if not writes_metrics:  # an online worker of another role
        return RunResult(str(run_dir), pl.DataFrame(), runner.plan, runner.ran, runner.skipped,
                         recipe.launch)
    metrics = pl.read_parquet(run_dir / METRICS_FILE)
    return RunResult(str(run_dir), metrics, runner.plan, runner.ran, runner.skipped,
                     recipe.launch)


def resolve_rounds(cfg: RunConfig) -> tuple[Recipe, int]:
    """The recipe (file, name or object, with overrides) and the number of rounds to run."""
    recipe = cfg.recipe if isinstance(cfg.recipe, Recipe) else load_recipe(cfg.recipe,
                                                                             cfg.overrides)
    if cfg.execution:  # --executor ... options override the recipe's executor section
        recipe = dataclasses.replace(recipe, executor={**recipe.executor, **cfg.execution})
    rounds = cfg.rounds if cfg.rounds is not None else recipe.rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    return recipe, rounds


def _problems(runner: StageRunner, entry: dict[str, Any], out: Path, exclude_from: str | None,
              upstream: list[str]) -> tuple[str, str]:
    """(table url, hash) of a problem set: an existing table, or generated arith problems."""
    pcfg = inputs.problems_config(entry, str(out), exclude_from=exclude_from)
    if isinstance(pcfg, str):
        if runner.dry_run:
            return pcfg, config_hash({"path": pcfg})
        from scope_data.shards import read_manifest

        return pcfg, config_hash({"path": pcfg, "content": read_manifest(pcfg).content_hash})
    digest = runner.stage("problems", out.name, pcfg, upstream,
                          inputs.write_problems)
    return pcfg.out, digest


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    path = run_dir / "recipe.json"
    from scope_data.shards import redact

    # storage options and secret-looking values never reach the run folder
    text = json.dumps(redact(recipe.to_dict()), indent=1, sort_keys=True, default=str)
    if path.is_file() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out"
        )
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if not RUN_ENTRY.fullmatch(p.name)) if run_dir.is_dir() else []
    if foreign:
        from pipelines.console import printable

        raise FileExistsError(
            f"{run_dir} holds files `scope run` did not write ({printable(', '.join(foreign[:3]))}"
            f"{', ...' if len(foreign) > 3 else ''}); a run writes only into a new folder or its "
            "own run folder: choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _round(runner: StageRunner, recipe: Recipe, run_dir: Path, r: int, latest: tuple[str, str],
           behaviour: tuple[str, str, int], train_problems: str, problem_hashes: dict[str, str],
           carried: str | None, rounds: int) -> tuple[str, str, str | None]:
    """generate (with the `behaviour` policy) -> score -> correct -> train (the `latest`
    policy, continuing the trainer state of `carried`) for round r; returns the new policy spec
    + hash and the train folder the next round continues. Offline both policies are round
    r-1's."""
    where = f"round-{r:04d}"
    rd = round_dir(run_dir, r)
    if recipe.dynamic_sampling:  # DAPO: batches until enough groups have non-zero advantage
        from pipelines.loop.sampling import dynamic_round

        table, h = dynamic_round(runner, recipe, run_dir, r, behaviour[0], behaviour[1],
                                 train_problems, problem_hashes)
        return _train(runner, recipe, rd, where, r, table, h, latest, carried, rounds)
    gcfg = stages.generate_config(recipe, train_problems, behaviour[0], str(rd / "generate"), r,
                                  policy_version=behaviour[2])
    h = runner.stage(where, "generate", gcfg, [problem_hashes["train"], behaviour[1]],
                     stages.run_generate)
    table = gcfg.out
    algo = get_algo(recipe.algo)
    if algo.uses_prm:
        scfg = stages.score_config(recipe, table, str(rd / "score"))
        h = runner.stage(where, "score", scfg, [h], stages.run_score)
        table = scfg.out
    if algo.uses_corrections:
        ccfg = stages.correct_config(recipe, table, str(rd / "correct"), r)
        h = runner.stage(where, "correct", ccfg, [h], stages.run_correct)
        table = ccfg.out
    return _train(runner, recipe, rd, where, r, table, h, latest, carried, rounds)


def _train(runner: StageRunner, recipe: Recipe, rd: Path, where: str, r: int, table: str,
           h: str, latest: tuple[str, str], carried: str | None, rounds: int
           ) -> tuple[str, str, str | None]:
    policy, policy_hash = latest
    tcfg = stages.train_config(recipe, table, policy, str(rd / "train"), r, carried, rounds)
    h = runner.stage(where, "train", tcfg, [h, policy_hash], stages.run_train)
    return stages.trained_policy(tcfg), h, stages.carried_from(tcfg)


def _evaluate(runner: StageRunner, recipe: Recipe, run_dir: Path, at: tuple[int, int],
              policy: str, policy_hash: str, eval_sets: dict[str, str],
              problem_hashes: dict[str, str]) -> None:
    """Evaluate the policy after round r of `rounds` (at = (r, rounds)) on each due set."""
    from pipelines.stages import evaluate

    r, rounds = at
    where = f"round-{r:04d}"
    every = {e["name"]: e.get("every", 1) for e in recipe.eval}
    for name, url in eval_sets.items():
        if not stages.eval_due(every[name], r, rounds):
            continue
        ecfg = stages.eval_config(recipe, policy, url, str(round_dir(run_dir, r) / "eval" / name),
                                  r)
        runner.stage(where, f"eval-{name}", ecfg, [problem_hashes[name], policy_hash],
                     evaluate.run)


def _write_metrics(run_dir: Path, recipe: Recipe, last_round: int, rounds: int) -> None:
    """Rebuild RUN_DIR/metrics.parquet from every finished round of a `rounds`-round run
    (idempotent on resume) and log the last round into the run's tracker (`round_tracking`)."""
    rows: list[dict[str, Any]] = []
    for r in range(0, last_round + 1):
        rows.extend(stages.round_metrics(recipe, round_dir(run_dir, r), r, rounds))
    frame = pl.DataFrame(rows, infer_schema_length=None)
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    frame.write_parquet(tmp)
    tmp.replace(run_dir / METRICS_FILE)
    log_round(stages.tracker(recipe, run_dir), frame, last_round, round_dir(run_dir, last_round))

