"""The local executor: shard tasks in `--workers` worker processes on this machine.

Each try of a shard is a fresh Python process (`python -m pipelines.executors.local TASK`, the
task pickled in a file beside its logs), so a crash, even a SIGKILL, costs only that try and the
caller's main module is never re-imported; at most `workers` run at once, each with
`--cpus-per-task` threads ($OMP_NUM_THREADS, unless set); a failed try is rerun up to `retries`
times.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.executors.base import ExecutorOptions, failed, run_task


def run(fn: Callable[..., Any], cfg: Any, pending: list[int], opts: ExecutorOptions,
        logs: str, command: str) -> list[dict[str, Any]]:
    """Run shard k of `fn(cfg)` for every k in `pending`; TaskFailed names those that kept
    failing. Returns one record per shard (seconds, log, tries)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # like Ray: a task's torch/BLAS threads = its CPUs (W workers x all cores oversubscribe)
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(opts.cpus_per_task))))
    queue = deque((k, 0) for k in pending)
    running: dict[int, tuple[int, subprocess.Popen[bytes], Path]] = {}  # k -> (try, proc, out)
    done: list[dict[str, Any]] = []
    failures: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="scope-tasks-") as tmp:
        try:
            while queue or running:
                while queue and len(running) < opts.workers:
                    k, tries = queue.popleft()
                    task, out = Path(tmp) / f"{k}.{tries}.task", Path(tmp) / f"{k}.{tries}.out"
                    task.write_bytes(pickle.dumps((fn, cfg, k, logs, str(out))))
                    proc = subprocess.Popen([sys.executable, "-m", __name__, str(task)], env=env,
                                            stdin=subprocess.DEVNULL)
                    running[k] = (tries, proc, out)
                finished = [k for k, (_, proc, _) in running.items() if proc.poll() is not None]
                if not finished:
                    time.sleep(0.05)
                for k in finished:
                    tries, proc, out = running.pop(k)
                    if proc.returncode == 0 and out.is_file():
                        done.append({**pickle.loads(out.read_bytes()), "tries": tries + 1})
                    elif tries < opts.retries:
                        queue.append((k, tries + 1))
                    else:
                        failures[k] = f"{logs}/shard-{k:05d}-of-{cfg.num_shards:05d}.try-*.log"
        finally:
            for _, proc, _ in running.values():
                proc.kill()
                proc.wait()
    if failures:
        raise failed(command, failures)
    return done


def _main(task_file: str) -> None:
    fn, cfg, k, logs, out = pickle.loads(Path(task_file).read_bytes())
    record = run_task(fn, cfg, k, logs)
    Path(out).write_bytes(pickle.dumps(record))


if __name__ == "__main__":
    _main(sys.argv[1])
