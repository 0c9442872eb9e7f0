"""The Slurm executor: one `sbatch --array` script per stage, one array task per pending shard.

Array task k runs `scope <stage> <the stage's options> --shard-index $SLURM_ARRAY_TASK_ID`
(the same command a user would type), up to `1 + retries` tries, its output in
`LOGS/slurm-<job>_<k>.log`. `--after JOB` chains stages (`--dependency=afterok:JOB`), `--wait`
blocks until the array ends (the round loop uses it), `--dry-run` prints the script. Storage
credentials reach the tasks through the environment sbatch exports ($SCOPE_STORAGE_OPTIONS),
never through the script file.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from pipelines.executors.base import COMMAND_ARGS, ExecutorOptions, shard_config


def array_spec(pending: list[int], num_shards: int) -> str:
    """`0-(N-1)` when every shard is pending, else the list of pending indices."""
    if pending == list(range(num_shards)):
        return f"0-{num_shards - 1}"
    return ",".join(str(k) for k in pending)


def task_command(cfg: Any, command: str, opts: ExecutorOptions) -> str:
    """The array task's command line (its shard index left to $SLURM_ARRAY_TASK_ID)."""
    if not COMMAND_ARGS:
        raise RuntimeError("the slurm executor writes `scope` command lines: import cli.options")
    words, notes = COMMAND_ARGS[0](shard_config(cfg, None))
    if notes:
        raise ValueError(f"scope {command}: options without a command-line flag cannot be sent "
                         f"to a slurm job: {', '.join(notes)}")
    line = " ".join([*shlex.split(opts.launcher), command, *(shlex.quote(w) for w in words)])
    return line + ' --shard-index "$SLURM_ARRAY_TASK_ID"'


def script(cfg: Any, command: str, pending: list[int], opts: ExecutorOptions, logs: str) -> str:
    """The sbatch script of a stage's pending shards."""
    head = [f"--job-name=scope-{command}", f"--array={array_spec(pending, cfg.num_shards)}",
            f"--output={logs}/slurm-%A_%a.log",
            f"--cpus-per-task={max(1, math.ceil(opts.cpus_per_task))}"]
    if opts.gpus_per_task:
        head.append(f"--gpus-per-task={math.ceil(opts.gpus_per_task)}")
    if opts.mem_per_task:
        head.append(f"--mem={opts.mem_per_task}")
    if opts.partition:
        head.append(f"--partition={opts.partition}")
    if opts.time:
        head.append(f"--time={opts.time}")
    if opts.after:
        head.append(f"--dependency=afterok:{opts.after.replace(',', ':')}")
    head += shlex.split(opts.sbatch_args or "")
    lines = ["#!/bin/bash", *(f"#SBATCH {h}" for h in head),
             f"# scope {command}: shard $SLURM_ARRAY_TASK_ID of {cfg.num_shards}; the table's "
             "completion markers say which shards are done",
             "set -u",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-"
             f"{max(1, math.ceil(opts.cpus_per_task))}}}  # torch threads = the task's CPUs",
             f"for try in $(seq 0 {opts.retries}); do",
             '  echo "# try $try of shard $SLURM_ARRAY_TASK_ID on $(hostname)"',
             f"  {task_command(cfg, command, opts)} && exit 0",
             "done",
             "exit 1", ""]
    return "\n".join(lines)


def submit(cfg: Any, command: str, pending: list[int], opts: ExecutorOptions, logs: str) -> Any:
    """Write and submit (or print, with --dry-run) the stage's array job."""
    from pipelines.console import print_summary
    from pipelines.executors.shard_executor import StageResult
    from scope_data.layout import part_name
    from scope_data.shards import read_manifest

    n = cfg.num_shards
    text = script(cfg, command, pending, opts, logs)
    missing = [part_name(k, n) for k in pending]
    if opts.dry_run:
        print(text, end="")
        return StageResult(None, 0, n - len(pending), missing, {})
    Path(logs).mkdir(parents=True, exist_ok=True)
    path = Path(logs) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    path.write_text(text)
    env = dict(os.environ)
    if cfg.storage_options:
        env["SCOPE_STORAGE_OPTIONS"] = json.dumps(cfg.storage_options)
    argv = ["sbatch", "--parsable", *(["--wait"] if opts.wait else []), str(path)]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("--executor slurm: `sbatch` not found on PATH") from None
    job = proc.stdout.strip().split(";")[0].splitlines()[-1] if proc.stdout.strip() else "?"
    if proc.returncode != 0:
        raise RuntimeError(f"scope {command}: sbatch {path} failed (exit {proc.returncode}, "
                           f"job {job}): {proc.stderr.strip()[-500:]}; task logs in {logs}")
    rows = [("output", cfg.out), ("slurm job", job),
            ("array", array_spec(pending, n)), ("script", str(path)), ("logs", logs)]
    if not opts.wait:
        print_summary(f"scope {command} (slurm executor): submitted", rows)
        return StageResult(None, 0, n - len(pending), missing, {})
    manifest = read_manifest(cfg.out, cfg.storage_options)
    print_summary(f"scope {command} (slurm executor)", [*rows, ("table rows", manifest.rows)])
    return StageResult(manifest, len(pending), n - len(pending), [], manifest.stats)
