"""The Ray executor: each pending shard is one Ray task with its resources (`--cpus-per-task`,
`--gpus-per-task`, `--mem-per-task`), retried by Ray (`max_retries`, application errors
included) when it raises or its worker dies.

The task writes its part to the shard store (a shared path or an object store) and returns a
few numbers; rows never go through the Ray object store. `--ray-address` connects to a running
cluster (`auto`, `ray://head:10001`, `host:port`); without it Ray starts on this machine. The
nodes need scope installed (`pip install 'scope-rlvr[ray]'`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.executors.base import ExecutorOptions, failed, memory_bytes, run_task


def run(fn: Callable[..., Any], cfg: Any, pending: list[int], opts: ExecutorOptions,
        logs: str, command: str) -> list[dict[str, Any]]:
    """Run shard k of `fn(cfg)` as a Ray task for every k in `pending`; TaskFailed names the
    shards whose tries all failed. Returns one record per shard (seconds, log, tries)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'scope-rlvr[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING", configure_logging=False)
    before = set(Path(logs).glob("shard-*.log"))
    resources: dict[str, Any] = {"num_cpus": opts.cpus_per_task, "num_gpus": opts.gpus_per_task,
                                 "max_retries": opts.retries, "retry_exceptions": True}
    if opts.mem_per_task:
        resources["memory"] = memory_bytes(opts.mem_per_task)
    task = ray.remote(run_task).options(name=f"scope-{command}", **resources)
    try:
        refs = {k: task.remote(fn, cfg, k, logs) for k in pending}
        done, failures = [], {}
        for k, ref in refs.items():
            try:
                done.append(ray.get(ref))
            except ray.exceptions.RayError:
                failures[k] = f"{logs}/shard-{k:05d}-of-{cfg.num_shards:05d}.try-*.log"
    finally:
        if started:
            ray.shutdown()
    tries: dict[int, int] = {}
    for path in set(Path(logs).glob("shard-*.log")) - before:
        k = int(path.name.split("-")[1])
        tries[k] = tries.get(k, 0) + 1
    if failures:
        raise failed(command, failures)
    return [{**r, "tries": tries.get(r["shard"], 1)} for r in done]
