"""Online mode: the round loop's stages run as long-lived workers over one run folder.

`scope worker ROLE --run RUN_DIR` walks the same plan as the offline `scope run` (same stage
configs, same hashes, same markers `round-XXXX/_stages/<stage>.json`) but runs only the stages
of its ROLE (generate, score, correct, train, eval); before each it waits for the markers of
the stages it reads. Shards on the run folder stay the only interface between stages, so the
workers may run on other machines against the same folder. Engines stay loaded across rounds
(`pipelines.engines.warm`): vLLM starts once, and each new policy version is loaded into the
running engine in place.

`--max-staleness K`: round r generates with the policy of round r-1-K. K = 0 is the offline
loop exactly (same tables, same weights); K >= 1 lets the generate worker run K rounds ahead of
the trainer (one-step-off and beyond); rows record which policy sampled them (`policy` column).

`--worker-index I --num-workers N` (generate, score, correct): N workers of one role split
each of its stages by shard; worker I runs the shards k with k % N == I (`Share`), and the one
whose shard completes the table (the shard store's `finalize`) writes the stage's marker.

`scope run RECIPE --online` is the launcher: it writes the problem sets, starts one worker
process per role (`--online-workers`: N for a role; logs in RUN_DIR/logs/<role>.log, or
<role>-<i>.log), prints a progress line per finished stage (`online_progress`), restarts a
worker that dies (a rerun resumes: finished parts and stages are kept), reports a worker that
keeps failing with the tail of its log, and rebuilds metrics.parquet at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.config import option, storage_options_field
from pipelines.loop import round_loop
from pipelines.loop.runner import ROLES, StageRunner, read_marker
from scope_data.algos import get_algo

SPLIT_ROLES = ("generate", "score", "correct")  # roles whose stages several workers may split
REMOTE_SPLIT = ("several workers per role need the run folder on a shared file system: on an "
                "object store each worker runs in its own mirror, where the others' parts of a "
                "stage never appear")
# a worker's marker check is one small read: a hand-off costs ~POLL/2 (a heap tidy, at the start
# of a wait, may add its ~0.25 s when the input arrives right then)
POLL_SECONDS = 0.01
REMOTE_POLL_SECONDS = 0.5  # on an object store a check is a request: poll less often
LAUNCHER_POLL_SECONDS = 0.2  # the launcher only prints progress and watches its workers
# imported before a worker first waits: else round 1 pays them after generate (5-10 s each)
PRELOAD = {"score": ["transformers"], "correct": ["transformers"],
           "train": ["transformers", "pipelines.training.trainer"]}


@dataclass
class WorkerConfig:
    """Options of `scope worker ROLE --run RUN_DIR`."""

    role: str = option(argument=True, help="generate | score | correct | train | eval")
    run: str = option(help="run folder written by `scope run --online` (holds recipe.json)")
    recipe: str | None = option(
        None, help="recipe file (default: RUN_DIR/recipe.json; pass the file where the recipe "
        "holds storage options, which recipe.json never stores)")
    rounds: int | None = option(None, help="rounds (default: the recipe's)")
    max_staleness: int = option(0, help="round r generates with the policy of round r-1-K")
    timeout: float = option(0.0, help="give up after waiting this many seconds for an input "
                            "(0: wait forever)")
    mirror: str | None = option(
        None, help="--run on an object store: the local working copy of the run folder "
        "(default: $SCOPE_CACHE/online/<hash of --run>/<role>)")
    worker_index: int = option(0, help="this worker's index I among the --num-workers N of its "
                               "role: it runs the shards k with k % N == I of each stage")
    num_workers: int = option(1, help="workers splitting each stage of this role by shard "
                              "(generate, score, correct; the stage's num_shards >= N)")
    storage_options: dict[str, Any] | None = storage_options_field()


@dataclass(frozen=True)
class Share:
    """Worker `index` of `count` splitting each stage of its role by shard (`StageRunner`)."""

    index: int
    count: int
    timeout: float = 0.0  # seconds a worker waits for worker 0 (`--timeout`; 0: forever)

    def run(self, action: Any, cfg: Any) -> bool:
        """Run our shards of the stage, each as shard jobs do (`action` on the config with
        `shard_index=k`); True when the table is finished: it has its manifest, which the
        shard store's `finalize` writes once every part is done (by whichever shard finished
        last; by any of ours when an earlier run had finished every part)."""
        from scope_data.shards import is_table

        for k in range(self.index, cfg.num_shards, self.count):
            action(replace(cfg, shard_index=k))
        return is_table(cfg.out, cfg.storage_options)

    def clears(self, marker: Path, digest: str) -> bool:
        """Whether this worker removes a stage's output that `marker` shows done with another
        config: worker 0 does (then removes the marker); the others wait until it has (at most
        `timeout` seconds, 0: forever)."""
        if self.index == 0:
            return True
        t0 = time.monotonic()
        while (body := read_marker(marker)) is not None and body.get("config_hash") != digest:
            if self.timeout and time.monotonic() - t0 > self.timeout:
                raise TimeoutError(f"waited {self.timeout:g} s for worker 0 of {self.count} to "
                                   f"clear {marker}, left by a run with another config")
            time.sleep(POLL_SECONDS)
        return False


def check_share(role: str, index: int, count: int) -> None:
    """Refuse a worker index outside [0, count) and a split of a role that runs alone."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--worker-index {index} is not in [0, --num-workers {count})")
    if count > 1 and role not in SPLIT_ROLES:
        raise ValueError(f"the {role} worker runs alone (--num-workers 1); several workers "
                         f"split only {', '.join(SPLIT_ROLES)}")


def check_shards(recipe: str, plan: list[tuple[str, Any]], counts: dict[str, int]) -> None:
    """Refuse a split stage with fewer shards than its workers (`plan`: the loop's dry run of
    the recipe named `recipe`)."""
    for kind, cfg in plan:
        n = counts.get(kind, 1)
        if n > 1 and cfg.num_shards < n:
            raise ValueError(f"recipe {recipe}, {kind}: num_shards {cfg.num_shards} is less than "
                             f"its {n} workers; set `{kind}: {{num_shards: {n}}}` (or more)")


def worker_counts(counts: dict[str, Any], remote: bool) -> dict[str, int]:
    """The checked `--online-workers` (role -> worker processes)."""
    for role, n in counts.items():
        if role not in ROLES:
            raise ValueError(f"--online-workers: unknown role {role!r}; use one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"--online-workers: {role} needs a whole number >= 1, got {n!r}")
        check_share(role, 0, n)
        if n > 1 and remote:
            raise ValueError(REMOTE_SPLIT)
    return dict(counts)


def roles_of(recipe: Any) -> list[str]:
    """The worker roles a recipe's algorithm needs."""
    algo = get_algo(recipe.algo)
    return [r for r in ROLES if (r != "score" or algo.uses_prm)
            and (r != "correct" or algo.uses_corrections)]


def check_online(recipe: Any) -> None:
    """Refuse what online workers cannot plan ahead: with dynamic sampling, how many batches a
    round draws depends on its rollouts."""
    if recipe.dynamic_sampling:
        raise ValueError(f"recipe {recipe.name}: dynamic_sampling runs in the offline loop only "
                         "(the batches a round draws depend on its rollouts); drop --online")


def _waiter(timeout: float, store: Any = None) -> Any:
    def wait(marker: Path, digest: str) -> None:
        t0 = time.monotonic()
        tidied = False
        while True:
            if store is not None and store.pull(marker, digest):
                return
            if (read_marker(marker) or {}).get("config_hash") == digest:
                return
            if not tidied:
                tidy_heap()
                tidied = True
            if timeout and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waited {timeout:g} s for {marker} (hash {digest[:12]})")
            time.sleep(POLL_SECONDS if store is None else REMOTE_POLL_SECONDS)
    return wait


def tidy_heap() -> None:
    """A full garbage collection while a worker waits for its input, then the survivors frozen
    (`gc.freeze`): a collection inside the next stage (the Trainer's `free_memory` runs one at
    every `train()`, 0.25 s in a worker holding torch, transformers and a model) then scans only
    what that stage allocated. Frozen objects freed by reference counts are freed as usual;
    cycles among them wait for the next tidy."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _sole_trainer(run_dir: Path):
    """An exclusive lock on RUN_DIR/.train.lock: a run folder refuses a second trainer."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".train.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir} already has a running train worker "
                               "(.train.lock is held); a run folder takes one trainer") from None
        yield


def run_worker(cfg: WorkerConfig) -> round_loop.RunResult:
    """Run the stages of one role over every round, waiting for their inputs."""
    from pipelines.engines.warm import warm_engines

    if cfg.role not in ROLES:
        raise ValueError(f"unknown worker role {cfg.role!r}; use one of {', '.join(ROLES)}")
    if cfg.max_staleness < 0:
        raise ValueError(f"--max-staleness must be >= 0, got {cfg.max_staleness}")
    check_share(cfg.role, cfg.worker_index, cfg.num_workers)
    from pipelines.loop.run_store import RunStore, TrainLock, default_mirror, is_remote

    if cfg.num_workers > 1 and is_remote(cfg.run):
        raise ValueError(REMOTE_SPLIT)
    store = None
    if is_remote(cfg.run):  # the stages run in a local mirror (pipelines.loop.run_store)
        store = RunStore(cfg.run, cfg.storage_options,
                         Path(cfg.mirror) if cfg.mirror else default_mirror(cfg.run, cfg.role))
        run_dir = store.local
        if not cfg.recipe:
            store.pull_file("recipe.json")
    else:
        run_dir = Path(cfg.run).expanduser().resolve()
    recipe_file = cfg.recipe or str(run_dir / "recipe.json")
    if not Path(recipe_file).is_file():
        raise FileNotFoundError(f"{recipe_file} not found: start the run with "
                                "`scope run RECIPE --online` (or pass --recipe)")
    from pipelines.loop.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    check_online(recipe)
    # a worker runs its stages in process, on its warm engines (not through an executor)
    recipe = replace(recipe, executor={})
    run_cfg = round_loop.RunConfig(recipe=recipe, out=str(run_dir), rounds=cfg.rounds,
                                   resume=True, verbose=False)
    share = None
    if cfg.num_workers > 1:
        share = Share(cfg.worker_index, cfg.num_workers, cfg.timeout)
        check_shards(recipe.name, round_loop.run(replace(run_cfg, dry_run=True)).plan,
                     {cfg.role: cfg.num_workers})
    runner = StageRunner(run_dir, True, False, False, role=cfg.role,
                         wait=_waiter(cfg.timeout, store), store=store,
                         mirror_all=store is not None and cfg.role == "eval", share=share)
    from pipelines.training.session import training_session

    train = cfg.role == "train"  # the trainer keeps its model and states between rounds
    lock = contextlib.nullcontext() if not train else (
        TrainLock(store) if store else _sole_trainer(run_dir))
    with (lock, warm_engines(),
          training_session() if train else contextlib.nullcontext() as session):
        _preload(cfg.role)
        result = round_loop.run(run_cfg, runner=runner, max_staleness=cfg.max_staleness)
    if session is not None:
        from pipelines.console import console

        console.print(f"train: trainer continued in memory {session.stats['reuses']}, loaded "
                      f"from disk {session.stats['loads']}", highlight=False)
    if store is not None and cfg.role == "eval":
        store.push_file(round_loop.METRICS_FILE)
    return result


def _preload(role: str) -> None:
    """Import the role's heavy modules now, while its first input is being made upstream."""
    import importlib

    for name in PRELOAD.get(role, []):
        module = importlib.import_module(name)
        if name == "transformers":
            _ = module.AutoTokenizer  # a lazy module: the attribute does the real import


@dataclass
class _Worker:
    role: str  # its name: the role, or <role>-<i> for worker i of a split role
    cmd: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    done: bool = False

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as fh:
            fh.write(f"=== start {time.strftime('%H:%M:%S')} (restart {self.restarts}) ===\n")
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def launch(cfg: round_loop.RunConfig, max_restarts: int = 2) -> round_loop.RunResult:
    """`scope run --online`: problem sets here, then one worker process per role (N for a role
    of `--online-workers`)."""
    from pipelines.console import console
    from pipelines.loop.online_progress import OnlineProgress, read_local
    from pipelines.loop.run_store import RunStore, default_mirror, is_remote

    recipe, rounds = round_loop.resolve_rounds(cfg)
    check_online(recipe)
    counts = worker_counts(cfg.online_workers, is_remote(cfg.out))
    store = None
    if is_remote(cfg.out):  # run folder on an object store: this process works in a mirror
        store = RunStore(cfg.out, cfg.storage_options, default_mirror(cfg.out, "launcher"))
        if store.read_json("recipe.json") is not None and not cfg.resume:
            raise FileExistsError(f"{cfg.out} already holds a run; pass --resume to continue "
                                  "it, or choose a new --out")
    run_dir = store.local if store else Path(cfg.out).expanduser().resolve()
    cfg = replace(cfg, out=str(run_dir))
    # every stage config checked first
    check_shards(recipe.name, round_loop.run(replace(cfg, recipe=recipe, dry_run=True)).plan,
                 counts)
    round_loop._check_run_dir(run_dir, recipe, cfg.resume or store is not None)
    t0 = time.monotonic()
    # the problem sets (and the plan's hashes) first, in this process
    runner = StageRunner(run_dir, True, False, False, role="problems",
                         wait=_waiter(0, store), store=store)
    round_loop.run(replace(cfg, recipe=recipe, resume=True), runner=runner)
    if store is not None:
        store.push_file("recipe.json")
    import torch

    # the launcher's torch thread count in every worker: float sums (so sampled tokens) are
    # bit-reproducible only at one count, and K = 0 must give the offline run's tables
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONUNBUFFERED": "1"}
    if store is not None and cfg.storage_options:
        env["SCOPE_STORAGE_OPTIONS"] = json.dumps(cfg.storage_options)
    workers = []
    for role in roles_of(recipe):
        cmd = [sys.executable, "-m", "cli.main", "worker", role,
               "--run", store.url if store else str(run_dir),
               "--rounds", str(rounds), "--max-staleness", str(cfg.max_staleness),
               "--recipe", str(run_dir / "recipe.json")]
        n = counts.get(role, 1)
        for i in range(n):
            name, share = (role, []) if n == 1 else (
                f"{role}-{i}", ["--worker-index", str(i), "--num-workers", str(n)])
            workers.append(_Worker(name, cmd + share, run_dir / "logs" / f"{name}.log"))
    for w in workers:
        w.start(env)
    progress = OnlineProgress(run_dir, cfg.max_staleness, roles_of(recipe),
                              store.read_json if store else read_local(run_dir), t0=t0)
    try:
        while not all(w.done for w in workers):
            progress.update(store.markers() if store else sorted(
                m.relative_to(run_dir).as_posix()
                for m in run_dir.glob("round-*/_stages/*.json")),
                lambda line: console.print(line, highlight=False, markup=False,
                                           soft_wrap=True))
            for w in workers:
                code = None if w.done or w.proc is None else w.proc.poll()
                if code == 0:
                    w.done = True
                elif code is not None:
                    if w.restarts >= max_restarts:
                        raise RuntimeError(
                            f"the {w.role} worker failed {w.restarts + 1} times (exit {code}); "
                            f"its log {w.log} ends with:\n{w.tail()}")
                    console.print(f"[yellow]{w.role} worker exited {code}; restarting it "
                                  f"(it resumes from the finished parts)[/]", highlight=False)
                    w.restarts += 1
                    w.start(env)
            time.sleep(LAUNCHER_POLL_SECONDS)
    finally:
        for w in workers:
            w.stop()
    if store is not None:  # the eval worker's (it read every round's eval and train folders)
        store.pull_file(round_loop.METRICS_FILE)
    else:
        round_loop._write_metrics(run_dir, recipe, rounds, rounds)
    import polars as pl

    metrics = pl.read_parquet(run_dir / round_loop.METRICS_FILE)
    from pipelines.console import print_summary

    print_summary("online workers", progress.summary_rows(
        {w.role: {"restarts": w.restarts} for w in workers}))
    ran = [m.removesuffix(".json").replace("/_stages/", "/") for m in sorted(progress.seen)]
    return round_loop.RunResult(
        str(run_dir), metrics, [], ran, [], recipe.launch,
        workers={w.role: {"restarts": w.restarts, "log": str(w.log)} for w in workers},
        seconds=time.monotonic() - t0)
