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

`scope run RECIPE --online` is the launcher (`pipelines.loop.online_launch`): it starts one
worker process per role (`--online-workers`: N for a role), shows their progress, restarts a
worker that dies (a rerun resumes: finished parts and stages are kept) and rebuilds
metrics.parquet at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.config import option, storage_options_field
from pipelines.loop import round_loop
from pipelines.loop.runner import ROLES, StageRunner, marker_hash, read_marker
from scope_data.algos import get_algo

SPLIT_ROLES = ("generate", "score", "correct")  # roles whose stages several workers may split
REMOTE_SPLIT = ("several workers per role need the run folder on a shared file system: on an "
                "object store each worker runs in its own mirror, where the others' parts of a "
                "stage never appear")
# a worker's marker check is one small read: a hand-off costs ~POLL/2 (a heap tidy, at the start
# of a wait, may add its few ms, 0.2 s when it is a full one, when the input arrives right then)
POLL_SECONDS = 0.002
REMOTE_POLL_SECONDS = 0.5  # on an object store a check is a request: poll less often
LINGER_POLL_SECONDS = 0.05  # a worker staying for the last round's training (`--linger`)
# a full heap tidy at most this often: cycles among objects alive at a tidy are freed by it
FULL_TIDY_SECONDS = 60.0
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
    linger: bool = option(
        False, help="generate, score, correct: leave once the run's last round is trained (or "
        "the launcher is gone), not at once: the local launcher sets it, as workers sharing a "
        "machine would slow that training by their exit; on a shared file system only")
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


def marker_waiter(timeout: float, store: Any = None) -> Any:
    def wait(marker: Path, digest: str) -> None:
        t0 = time.monotonic()
        tidied = False
        while True:
            if store is not None and store.pull(marker, digest):
                return
            if marker_hash(marker) == digest:
                return
            if not tidied:
                tidy_heap()
                tidied = True
            if timeout and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waited {timeout:g} s for {marker} (hash {digest[:12]})")
            time.sleep(POLL_SECONDS if store is None else REMOTE_POLL_SECONDS)
    return wait


def tidy_heap() -> None:
    """A garbage collection while a worker waits for its input, then the survivors frozen
    (`gc.freeze`): a collection inside the next stage (the Trainer's `free_memory` runs one at
    every `train()`, 0.25 s in a worker holding torch, transformers and a model) then scans only
    what that stage allocated. The tidy itself scans only what was allocated since the last
    one (ms); at most every FULL_TIDY_SECONDS it unfreezes and scans the whole heap (0.2 s of
    CPU, taken from the other workers' stages on a small machine; at paper scale, with rounds
    of minutes, every tidy is a full one). Frozen objects freed by reference counts are freed
    as usual; cycles among them (a replaced engine, say) wait for the next full tidy."""
    import gc

    global _last_full_tidy
    if time.monotonic() - _last_full_tidy >= FULL_TIDY_SECONDS:
        gc.unfreeze()
        _last_full_tidy = time.monotonic()
    gc.collect()
    gc.freeze()


_last_full_tidy = -math.inf


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
                         wait=marker_waiter(cfg.timeout, store), store=store,
                         mirror_all=store is not None and cfg.role == "eval", share=share)
    from pipelines.training.session import training_session

    train = cfg.role == "train"  # the trainer keeps its model and states between rounds
    lock = contextlib.nullcontext() if not train else (
        TrainLock(store) if store else _sole_trainer(run_dir))
    with (lock, warm_engines(),
          training_session() if train else contextlib.nullcontext() as session):
        _preload(cfg.role)
        result = round_loop.run(run_cfg, runner=runner, max_staleness=cfg.max_staleness)
        if cfg.linger and cfg.role in SPLIT_ROLES and store is None:
            _linger(runner)
    if session is not None:
        from pipelines.console import console

        console.print(f"train: trainer continued in memory {session.stats['reuses']}, loaded "
                      f"from disk {session.stats['loads']}", highlight=False)
    if store is not None and cfg.role == "eval":
        store.push_file(round_loop.METRICS_FILE)
    return result


def _linger(runner: StageRunner) -> None:
    """`--linger`: a generate, score or correct worker leaves once the run's last round is
    trained, or its launcher is gone: its exit (engines torn down; 1-2 s of CPU per process
    with vLLM) would slow that round's training on a machine the workers share."""
    trains = [(digest, m) for digest, m in runner.markers.items() if m.name == "train.json"]
    if not trains:
        return
    digest, marker = trains[-1]
    parent, t0 = os.getppid(), time.monotonic()
    while not (trained := marker_hash(marker) == digest):
        if os.getppid() != parent:
            break
        time.sleep(LINGER_POLL_SECONDS)
    until = (f"{runner.relative({'m': str(marker)})['m']} was written" if trained
             else "the launcher was gone")
    print(f"stayed {time.monotonic() - t0:.1f} s, until {until}", flush=True)


def _preload(role: str) -> None:
    """Import the role's heavy modules now, while its first input is being made upstream."""
    import importlib

    for name in PRELOAD.get(role, []):
        module = importlib.import_module(name)
        if name == "transformers":
            _ = module.AutoTokenizer  # a lazy module: the attribute does the real import
