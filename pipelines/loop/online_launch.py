"""`scope run RECIPE --online`: the launcher of an online run (`pipelines.loop.online` has the
workers). It writes the problem sets, starts the worker processes, prints the progress view
(`pipelines.loop.online_progress`), restarts a worker that dies and stops the run with the tail
of its log when one keeps failing, and rebuilds metrics.parquet at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.loop import round_loop
from pipelines.loop.online import (
    SPLIT_ROLES,
    check_online,
    check_shards,
    marker_waiter,
    roles_of,
    worker_counts,
)
from pipelines.loop.runner import StageRunner

LAUNCHER_POLL_SECONDS = 0.2  # the launcher only prints progress and watches its workers


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
                         wait=marker_waiter(0, store), store=store)
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
        if role in SPLIT_ROLES and store is None:
            cmd.append("--linger")  # their exit would slow the last round's training here
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
