"""Executors: the same 8-shard `scope generate` job in this process, on the local executor
(worker processes) and on Ray (tasks on a Ray started on this machine), in one run.

Prints each executor's wall time, the time its tasks spent inside the stage (each task's log
ends with `# done in X s`), and the executor's overhead per task:

    overhead per task = (wall x slots - sum of task seconds) / tasks

(the slot time not spent in the stage: launching, scheduling, idle slots at the end; a task's
own seconds include the imports its stage does lazily, e.g. transformers in a fresh process).
Ray is timed after cluster start-up (printed apart), twice: `cold` (the job's first tasks start
fresh worker processes, which import torch) and `warm` (the same workers again). Target: warm
Ray <= 1 s per task. The local executor starts a fresh process per task, so its overhead is
mostly Python + torch imports. Ratios are against the in-process run (workers=1; it uses all
cores as torch threads, which on a busy machine is far slower than one thread: compare with
`OMP_NUM_THREADS=1`, the thread count Ray and the local executor give a 1-CPU task).

    .venv/bin/python benchmarks/bench_executors.py --shards 8 --workers 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.stages.generate import GenerateConfig, run  # noqa: E402
from tests.helpers_engines import build_random_tiny, write_problems  # noqa: E402


def task_seconds(logs: Path) -> list[float]:
    return [float(m.group(1)) for p in sorted(logs.glob("shard-*.log"))
            if (m := re.search(r"# done in ([0-9.]+) s", p.read_text()))]


def timed(base: dict, out: Path, execution: dict) -> tuple[float, list[float]]:
    logs = Path(str(out) + ".logs")
    t0 = time.perf_counter()
    result = run(GenerateConfig(out=str(out), execution=execution, **base), quiet=True)
    wall = time.perf_counter() - t0
    assert result.manifest is not None
    return wall, task_seconds(logs) if logs.is_dir() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="local workers = Ray CPUs")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    try:
        model = build_random_tiny(root / "model")
        write_problems(str(root / "problems"), n=args.problems)
        base = {"problems": str(root / "problems"), "policy": f"hf:{model}", "n": args.n,
                "max_new_tokens": args.max_new_tokens, "seed": 0, "num_shards": args.shards}
        timed(base, root / "warm-up", {})  # imports and first-call costs paid before timing
        rows = []
        wall, _ = timed(base, root / "inproc", {})
        baseline = wall
        rows.append(("in-process (workers=1)", wall, [], 1))
        wall, secs = timed(base, root / "local", {"workers": args.workers})
        rows.append((f"local (workers={args.workers})", wall, secs, args.workers))
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only: no token file
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        startup = time.perf_counter() - t0
        try:
            for label in ("cold", "warm"):
                wall, secs = timed(base, root / f"ray-{label}", {"executor": "ray"})
                rows.append((f"ray {label} ({args.workers} CPUs)", wall, secs, args.workers))
        finally:
            ray.shutdown()
        print(f"{args.shards} shards, {args.problems} problems x n={args.n}, "
              f"max_new_tokens={args.max_new_tokens}; Ray start-up {startup:.1f} s (not counted); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'executor':<24}{'wall s':>9}{'vs in-proc':>12}{'task s (sum)':>14}"
              f"{'overhead s/task':>17}")
        for label, wall, secs, slots in rows:
            over = (wall * slots - sum(secs)) / len(secs) if secs else float("nan")
            print(f"{label:<24}{wall:>9.2f}{wall / baseline:>11.2f}x{sum(secs):>14.2f}"
                  f"{over:>17.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
