"""A stand-in `sbatch` for the Slurm executor tests (no slurmctld here): installed on PATH as
`sbatch`, it reads the script's `#SBATCH` lines and runs every array task as `bash SCRIPT`
with SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID set (all tasks at once, like a cluster with room),
output to `--output` (%A job, %a task). `--dependency=afterok:ID[:ID]` is honoured: the job
runs only if every named job completed; otherwise it never runs (DependencyNeverSatisfied).
Jobs run at submission, so a dependency is always decided. Job states go to
$SBATCH_STANDIN_STATE/<job>.json. `--wait`: exit 1 unless every task succeeded.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


def _options(argv: list[str], script: str) -> dict[str, str]:
    words = [w for line in Path(script).read_text().splitlines() if line.startswith("#SBATCH ")
             for w in shlex.split(line[len("#SBATCH "):])]
    opts: dict[str, str] = {}
    for w in [*words, *argv]:  # command-line options win over #SBATCH lines
        key, _, value = w.partition("=")
        opts[key] = value
    return opts


def _indices(spec: str) -> list[int]:
    out: list[int] = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str]) -> int:
    state = Path(os.environ["SBATCH_STANDIN_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    script = argv[-1]
    opts = _options(argv[:-1], script)
    job = str(1000 + len(list(state.glob("*.json"))))
    deps = opts.get("--dependency", "")
    after = deps.removeprefix("afterok:").split(":") if deps else []
    states = {d: json.loads((state / f"{d}.json").read_text())["state"]
              if (state / f"{d}.json").is_file() else "unknown" for d in after}
    record = {"job": job, "script": script, "options": opts, "after": after, "tasks": {}}
    if any(s != "COMPLETED" for s in states.values()):
        record["state"] = "DependencyNeverSatisfied"
    else:
        procs = {}
        for k in _indices(opts.get("--array", "0")):
            log = opts.get("--output", "slurm-%A_%a.out").replace("%A", job).replace("%a", str(k))
            env = {**os.environ, "SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": str(k),
                   "SLURM_JOB_ID": job}
            with open(log, "a") as f:
                procs[k] = subprocess.Popen(["bash", script], env=env, stdout=f,
                                            stderr=subprocess.STDOUT)
        record["tasks"] = {k: p.wait() for k, p in procs.items()}
        record["state"] = "COMPLETED" if not any(record["tasks"].values()) else "FAILED"
    (state / f"{job}.json").write_text(json.dumps(record))
    print(job)
    if "--wait" in opts and record["state"] != "COMPLETED":
        print(f"sbatch: job {job} {record['state']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
