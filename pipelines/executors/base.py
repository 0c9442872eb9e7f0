"""Executors: who runs the shards of a stage (datatrove's model: the executor splits, launches,
retries and logs; the shard store's completion markers are the one truth about what is done).

A sharded stage's `run(cfg)` is wrapped by `sharded(...)`: with `--executor local` (one worker,
no retries) it runs in this process as before; otherwise the wrapper

1. plans: runs the stage up to the point where it knows its full config and returns the shards
   whose part is not done with it (`shard_executor.plan`), so a rerun schedules only those;
2. hands one task per pending shard to the executor (`local`: worker processes on this machine,
   `ray`: Ray tasks with their resources, `slurm`: one `sbatch --array` script); a task is the
   stage's own `run` on `replace(cfg, shard_index=k)`, its output in a per-try log file;
3. returns the table's manifest, which the shard that finished last wrote.

Results travel through the shard store only: a task returns a few numbers (seconds, log path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import option
from scope_data.hashing import sha256_hex

EXECUTORS = ("local", "ray", "slurm")
EXECUTION_HELP = ("executor options as a JSON object (the --executor ... options below set its "
                  "keys; a recipe's `executor:` section fills it for every sharded stage)")


@dataclass
class ExecutorOptions:
    """Options of the executor that runs a sharded stage (`--executor` and friends)."""

    executor: str = option("local", help="who runs the shards: local (processes on this "
                           "machine) | ray (Ray tasks) | slurm (one sbatch --array job)")
    workers: int = option(1, help="local: shards run at once in worker processes (1: in this "
                          "process, one after another)")
    retries: int = option(0, help="reruns of a failed shard task before the stage fails")
    cpus_per_task: float = option(1.0, help="ray/slurm: CPUs per shard task")
    gpus_per_task: float = option(0.0, help="ray/slurm: GPUs per shard task")
    mem_per_task: str | None = option(None, help="ray/slurm: memory per shard task, e.g. 16G")
    ray_address: str | None = option(
        None, help="ray: cluster address (auto | ray://host:10001 | host:port); default: a "
        "Ray on this machine")
    partition: str | None = option(None, help="slurm: partition")
    time: str | None = option(None, help="slurm: time limit per array task, e.g. 04:00:00")
    after: str | None = option(None, help="slurm: job id(s) this stage's array waits for "
                               "(--dependency=afterok:ID[:ID])")
    wait: bool = option(False, flags="--wait/--no-wait",
                        help="slurm: block until the array finishes (sbatch --wait)")
    sbatch_args: str | None = option(None, help="slurm: more #SBATCH options, e.g. "
                                     "'--account=x --qos=y'")
    launcher: str = option("scope", help="slurm: the command that runs scope on the nodes")
    logs_dir: str | None = option(
        None, help="per-task logs (default: OUT.logs beside a local output; "
        "$SCOPE_CACHE/logs/<hash of OUT> for an object-store one)")
    dry_run: bool = option(False, flags="--dry-run",
                           help="slurm: print the sbatch script, submit nothing")

    def check(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, "
                             f"got {self.executor!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}")
        if self.cpus_per_task < 0 or self.gpus_per_task < 0:
            raise ValueError("--cpus-per-task and --gpus-per-task must be >= 0")
        if self.mem_per_task is not None:
            memory_bytes(self.mem_per_task)
        if self.dry_run and self.executor != "slurm":
            raise ValueError("--dry-run prints the sbatch script of --executor slurm")

    @property
    def dispatches(self) -> bool:
        """False when the stage simply runs in this process (the default)."""
        return self.executor != "local" or self.workers > 1 or self.retries > 0


@dataclass
class LoopExecutorOptions(ExecutorOptions):
    """The executor options of `scope run` (its own --dry-run prints the stage commands)."""

    dry_run: bool = option(False, cli=False, help="slurm: print the sbatch script")


def executor_options(execution: dict[str, Any] | None, where: str = "--execution"
                     ) -> ExecutorOptions:
    """The checked executor options of a config's `execution` dict (unknown keys named)."""
    names = [f.name for f in dataclasses.fields(ExecutorOptions)]
    unknown = sorted(set(execution or {}) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown executor option(s) {unknown}; valid: "
                         f"{', '.join(names)}")
    opts = ExecutorOptions(**(execution or {}))
    opts.check()
    return opts


def memory_bytes(text: str) -> int:
    """'16G' / '512M' / '2048' (MiB, Slurm's unit) as bytes; ValueError names the value."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--mem-per-task {text!r} is not a size such as 16G or 512M")
    unit = m.group(2).upper() or "M"
    return int(float(m.group(1)) * 1024 ** ("KMGT".index(unit) + 1))


def default_logs_dir(out: str) -> str:
    """Per-task logs live beside the table, never inside it (readers list the table folder)."""
    if "://" not in out or out.startswith("file://"):
        return str(Path(out.removeprefix("file://")).expanduser().resolve()) + ".logs"
    root = Path(os.environ.get("SCOPE_CACHE") or Path.home() / ".cache" / "scope") / "logs"
    return str(root / sha256_hex(out)[:16])


# -- the stage side ----------------------------------------------------------------------------
# `scope <stage>` command words of a config (cli/options.py registers `command_args`; the
# pipelines layer never imports the CLI). Used by the slurm executor's array task line.
COMMAND_ARGS: list[Callable[[Any], tuple[list[str], list[str]]]] = []


def register_command_args(fn: Callable[[Any], tuple[list[str], list[str]]]) -> None:
    COMMAND_ARGS[:] = [fn]


def sharded(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a sharded stage's `run(cfg, ...)`: dispatch to the configured executor.

    `command` is the stage's `scope` command word (the slurm array task runs it).
    """

    def decorate(run: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            opts = executor_options(cfg.execution)
            if cfg.shard_index is not None or not opts.dispatches:
                return run(cfg, *args, **kwargs)
            if args or any(v is not None for k, v in kwargs.items() if k != "quiet"):
                raise ValueError(f"scope {command}: engine instances cannot be sent to the "
                                 f"{opts.executor} executor; pass engine specs instead")
            return run_sharded(wrapper, cfg, command, opts)

        return wrapper

    return decorate


def shard_config(cfg: Any, shard_index: int | None) -> Any:
    """The config one task runs: shard k, in its own process (no executor options)."""
    return dataclasses.replace(cfg, shard_index=shard_index, execution={})


def run_sharded(fn: Callable[..., Any], cfg: Any, command: str, opts: ExecutorOptions) -> Any:
    """Plan, launch the pending shards of `fn(cfg)` on the executor, return the StageResult."""
    from pipelines.console import print_summary
    from pipelines.executors.shard_executor import StageResult, plan
    from scope_data.shards import ShardError, is_table, read_manifest

    t0 = time.perf_counter()
    n = cfg.num_shards
    try:
        pending = plan(lambda: fn(shard_config(cfg, None)))
    except ShardError:
        if not (opts.executor == "slurm" and (opts.after or opts.dry_run)):
            raise
        pending = list(range(n))  # the input is a job that has not run yet: all shards
    logs = opts.logs_dir or default_logs_dir(cfg.out)
    tasks: list[dict[str, Any]] = []
    if not pending and not opts.dry_run:  # every part done: write the manifest if no shard did
        fn(shard_config(cfg, None))
    elif opts.executor == "slurm":
        from pipelines.executors import slurm

        return slurm.submit(cfg, command, pending, opts, logs)
    else:
        Path(logs).mkdir(parents=True, exist_ok=True)
        if opts.executor == "ray":
            from pipelines.executors import ray_executor as impl
        else:
            from pipelines.executors import local as impl
        tasks = impl.run(fn, cfg, pending, opts, logs, command)
    manifest = read_manifest(cfg.out, cfg.storage_options) if is_table(
        cfg.out, cfg.storage_options) else None
    if manifest is None:
        raise ShardError(f"{cfg.out}: every shard task finished but the table has no manifest")
    wall = time.perf_counter() - t0
    tries = sum(t["tries"] for t in tasks)
    print_summary(f"scope {command} ({opts.executor} executor)", [
        ("output", cfg.out), ("shards run / already done", f"{len(pending)} / {n - len(pending)}"),
        ("task tries (incl. retries)", tries), ("table rows", manifest.rows),
        ("logs", logs), ("wall seconds", wall),
    ])
    return StageResult(manifest, len(pending), n - len(pending), [], manifest.stats)


class TaskFailed(RuntimeError):
    """Shard tasks that failed after all their tries; the message names shards and logs."""


def failed(command: str, failures: dict[int, str]) -> TaskFailed:
    lines = "; ".join(f"shard {k}: see {log}" for k, log in sorted(failures.items()))
    return TaskFailed(f"scope {command}: {len(failures)} shard task(s) failed after their "
                      f"retries ({lines}); finished parts are kept, rerun to retry the rest")


# -- the task side -----------------------------------------------------------------------------
def log_path(logs: str, shard_index: int, num_shards: int) -> Path:
    """A new log file for one try of shard k: shard-0000k-of-0000N.try-T.log (T counts on
    across tries and reruns)."""
    for t in range(10_000):
        path = Path(logs) / f"shard-{shard_index:05d}-of-{num_shards:05d}.try-{t}.log"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{logs}: too many log files for shard {shard_index}")


def run_task(fn: Callable[..., Any], cfg: Any, shard_index: int, logs: str) -> dict[str, Any]:
    """Run shard k of `fn(cfg)` here with stdout and stderr (file descriptors too) in its own
    log file; return how long it took. Called inside a worker process or Ray task."""
    path = log_path(logs, shard_index, cfg.num_shards)
    with open(path, "a", buffering=1) as log, _redirected(log):
        print(f"# scope shard {shard_index} of {cfg.num_shards}: pid {os.getpid()} on "
              f"{socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(shard_config(cfg, shard_index))
        except BaseException:
            import traceback

            traceback.print_exc()
            raise
        seconds = time.perf_counter() - t0
        print(f"# done in {seconds:.2f} s", flush=True)
    return {"shard": shard_index, "seconds": seconds, "log": str(path)}


@contextlib.contextmanager
def _redirected(log: Any):
    """Point fds 1 and 2 (and sys.stdout/err) at `log` for the block, then restore them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    old = sys.stdout, sys.stderr
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = old
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
