"""Executors: the same sharded `scope generate` on local worker processes, a real Ray cluster
on loopback (a shard failing once, a worker SIGKILLed mid-shard) and Slurm array jobs (a
stand-in `sbatch`, tests/sbatch_standin.py: no slurmctld here), each writing the table the local
executor writes."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipelines.executors.base import (
    ExecutorOptions,
    executor_options,
    memory_bytes,
    run_sharded,
)
from pipelines.executors.slurm import array_spec
from pipelines.stages.generate import GenerateConfig, run
from scope_data.layout import marker_name
from scope_data.shards import read_arrow, read_manifest
from tests.helpers_engines import build_random_tiny, write_problems
from tests.helpers_executors import FAIL_SHARD, generate_failing_once, ray_head

SHARDS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 4-shard generate job (tiny random model, 8 problems) and the table the local executor
    (2 worker processes) writes for it."""
    root = tmp_path_factory.mktemp("executors")
    model = build_random_tiny(root / "model")
    write_problems(str(root / "problems"), n=8)
    base = {"problems": str(root / "problems"), "policy": f"hf:{model}", "n": 2,
            "max_new_tokens": 24, "seed": 5, "num_shards": SHARDS}
    reference = str(root / "local")
    result = run(GenerateConfig(out=reference, execution={"workers": 2}, **base), quiet=True)
    assert result.manifest is not None and result.parts_written == SHARDS
    assert sorted(p.name for p in Path(reference + ".logs").iterdir()) == [
        f"shard-{k:05d}-of-{SHARDS:05d}.try-0.log" for k in range(SHARDS)]
    return root, base, read_arrow(reference)


def assert_same_rollouts(table: pa.Table, reference: pa.Table) -> None:
    """The same rows in the same order: every column equal, behaviour log-probs up to float
    rounding (a Ray task runs torch with its task's CPU count as thread count)."""
    assert table.schema.equals(reference.schema) and table.num_rows == reference.num_rows
    differ = [c for c in table.column_names if c != "behaviour_logprobs"
              and not table.column(c).equals(reference.column(c))]
    assert not differ, f"columns differ: {differ}"
    for x, y in zip(table.column("behaviour_logprobs").to_pylist(),
                    reference.column("behaviour_logprobs").to_pylist(), strict=True):
        assert len(x) == len(y) and all(abs(p - q) < 1e-4 for p, q in zip(x, y, strict=True))


def _tries(logs: str, k: int) -> list[str]:
    paths = sorted(Path(logs).glob(f"shard-{k:05d}-of-{SHARDS:05d}.try-*.log"))
    return [p.read_text() for p in paths]


def test_executor_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown executor option\(s\) \['executr'\]"):
        executor_options({"executr": "ray"})
    with pytest.raises(ValueError, match="--executor must be one of local, ray, slurm"):
        executor_options({"executor": "k8s"})
    with pytest.raises(ValueError, match="--dry-run prints the sbatch script"):
        executor_options({"executor": "ray", "dry_run": True})
    with pytest.raises(ValueError, match="'lots' is not a size"):
        executor_options({"mem_per_task": "lots"})
    assert memory_bytes("16G") == 16 << 30 and memory_bytes("512M") == 512 << 20
    assert memory_bytes("2048") == 2048 << 20  # Slurm's default unit: MiB
    assert not ExecutorOptions().dispatches and ExecutorOptions(workers=2).dispatches
    assert array_spec([0, 1, 2, 3], 4) == "0-3" and array_spec([1, 3], 4) == "1,3"


@pytest.mark.slow
def test_ray_retries_a_shard_that_fails_once_into_s3(job, s3_bucket) -> None:
    """4 Ray tasks on a 2-CPU head; shard 1 raises on its first try and is retried; the table
    on the S3 server equals the local executor's, row for row."""
    pytest.importorskip("ray", reason="Ray is the optional extra scope-rlvr[ray]")
    root, base, reference = job
    url, options = s3_bucket
    with ray_head(num_cpus=2) as address:
        cfg = GenerateConfig(out=f"{url}/ray", storage_options=options, **base,
                             execution={"executor": "ray", "ray_address": address,
                                        "retries": 1, "logs_dir": str(root / "ray-logs")})
        fn = functools.partial(generate_failing_once, str(root / "failed-once"))
        result = run_sharded(fn, cfg, "generate", executor_options(cfg.execution))
    assert result.manifest is not None and result.parts_written == SHARDS
    assert_same_rollouts(read_arrow(f"{url}/ray", options), reference)
    first, second = _tries(str(root / "ray-logs"), FAIL_SHARD)
    assert "injected failure" in first and "# done" not in first
    assert "# done" in second
    assert all(len(_tries(str(root / "ray-logs"), k)) == 1 for k in range(SHARDS)
               if k != FAIL_SHARD)
    # the storage options reached the tasks in their config, never the manifest
    assert "testing-secret-value" not in json.dumps(read_manifest(f"{url}/ray", options).config)


@pytest.mark.slow
def test_ray_worker_sigkilled_mid_shard_is_retried_without_losing_rows(job, tmp_path) -> None:
    pytest.importorskip("ray", reason="Ray is the optional extra scope-rlvr[ray]")
    root, base, reference = job
    out, logs = str(tmp_path / "ray"), tmp_path / "logs"
    killed: list[tuple[int, int]] = []

    def kill_first_running_shard() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for log in sorted(logs.glob("shard-*.try-0.log")):
                text = log.read_text()
                if text.startswith("# scope shard") and "# done" not in text:
                    pid = int(text.split(" pid ")[1].split()[0])
                    os.kill(pid, signal.SIGKILL)
                    killed.append((int(log.name.split("-")[1]), pid))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_running_shard, daemon=True)
    with ray_head(num_cpus=2) as address:
        watcher.start()
        result = run(GenerateConfig(out=out, **base, execution={
            "executor": "ray", "ray_address": address, "retries": 2, "logs_dir": str(logs)}),
            quiet=True)
        watcher.join(timeout=5)
    assert killed, "no shard task was seen running"
    shard, _ = killed[0]
    tries = _tries(str(logs), shard)
    assert len(tries) >= 2 and "# done" not in tries[0] and "# done" in tries[-1]
    assert result.manifest is not None and result.manifest.rows == reference.num_rows
    table = read_arrow(out)
    assert_same_rollouts(table, reference)
    assert len(set(table.column("rollout_id").to_pylist())) == table.num_rows


FAIL_ONCE = """#!/bin/bash
# test launcher: array task 1 fails on its first try, then the command runs
m="$FAILONCE_DIR/failed-$SLURM_ARRAY_TASK_ID"
if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ ! -e "$m" ]; then
  touch "$m"; echo "injected failure"; exit 3
fi
exec "$@"
"""


@pytest.fixture
def standin_sbatch(tmp_path, monkeypatch):
    """`sbatch` on PATH is tests/sbatch_standin.py; yields its job-state folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\nexec {sys.executable} "
                      f"{Path(__file__).parent / 'sbatch_standin.py'} \"$@\"\n")
    sbatch.chmod(0o755)
    state = tmp_path / "jobs"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_STANDIN_STATE", str(state))
    monkeypatch.setenv("FAILONCE_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "failonce.sh").write_text(FAIL_ONCE)
    return state


def _args(base: dict, out: str) -> list[str]:
    return ["generate", "--problems", base["problems"], "--policy", base["policy"],
            "--out", out, "--n", str(base["n"]), "--max-new-tokens",
            str(base["max_new_tokens"]), "--seed", str(base["seed"]),
            "--num-shards", str(SHARDS), "--executor", "slurm"]


@pytest.mark.slow
def test_slurm_array_script_dry_run_chain_retry_and_rerun(job, tmp_path, standin_sbatch) -> None:
    root, base, reference = job
    runner = CliRunner()
    out = str(tmp_path / "gen")
    dry = runner.invoke(app, [*_args(base, out), "--dry-run", "--partition", "debug", "--time",
                              "00:10:00", "--gpus-per-task", "1", "--mem-per-task", "4G"])
    assert dry.exit_code == 0, dry.output
    for line in ("#SBATCH --array=0-3", "#SBATCH --partition=debug", "#SBATCH --time=00:10:00",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --mem=4G", "for try in $(seq 0 0)"):
        assert line in dry.output
    assert f"scope generate --problems {base['problems']}" in dry.output
    assert '--num-shards 4 --shard-index "$SLURM_ARRAY_TASK_ID"' in dry.output
    assert "--executor" not in dry.output.split("scope generate", 1)[1]
    assert not Path(out).exists() and not standin_sbatch.exists()

    launcher = f"bash {tmp_path / 'failonce.sh'} {sys.executable} -m cli.main"
    res = runner.invoke(app, [*_args(base, out), "--wait", "--retries", "1",
                              "--launcher", launcher])
    assert res.exit_code == 0, res.output
    assert_same_rollouts(read_arrow(out), reference)
    (gen_job,) = [json.loads(p.read_text()) for p in standin_sbatch.glob("*.json")]
    assert gen_job["options"]["--array"] == "0-3" and gen_job["state"] == "COMPLETED"
    task1 = (Path(out + ".logs") / f"slurm-{gen_job['job']}_1.log").read_text()
    assert task1.index("# try 0") < task1.index("injected failure") < task1.index("# try 1")

    # a stage chained on the job: --dependency=afterok; an unknown dependency never runs
    score = ["score", "--rollouts", out, "--executor", "slurm", "--wait", "--launcher", launcher]
    res = runner.invoke(app, [*score, "--out", str(tmp_path / "scored"), "--after",
                              gen_job["job"]])
    assert res.exit_code == 0, res.output
    assert read_manifest(str(tmp_path / "scored")).rows == reference.num_rows
    res = runner.invoke(app, [*score, "--out", str(tmp_path / "never"), "--after", "999"])
    assert res.exit_code == 1 and "DependencyNeverSatisfied" in res.output
    assert not (tmp_path / "never").exists()
    jobs = [json.loads(p.read_text()) for p in sorted(standin_sbatch.glob("*.json"))]
    assert [j["options"].get("--dependency") for j in jobs] == [
        None, f"afterok:{gen_job['job']}", "afterok:999"]

    # a rerun schedules only the shard whose part is not done
    Path(out, marker_name(2, SHARDS)).unlink()
    dry = runner.invoke(app, [*_args(base, out), "--dry-run"])
    assert dry.exit_code == 0 and "#SBATCH --array=2\n" in dry.output


def test_recipe_executor_section_reaches_every_sharded_stage(tmp_path) -> None:
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_loop import RunConfig
    from pipelines.loop.round_loop import run as run_loop

    body = {"name": "t", "algo": "scope", "policy": "hf:x",
            "problems": {"arith": {"count": 4, "seed": 1}},
            "eval": [{"name": "h", "arith": {"count": 4, "seed": 2}}],
            "executor": {"executor": "slurm", "partition": "gpu", "retries": 1},
            "score": {"execution": {"gpus_per_task": 2}}}
    result = run_loop(RunConfig(recipe=recipe_from_dict(body), out=str(tmp_path / "r"),
                                dry_run=True, execution={"time": "01:00:00"}))
    execution = {kind: cfg.execution for kind, cfg in result.plan
                 if kind in ("generate", "score", "correct")}
    common = {"executor": "slurm", "partition": "gpu", "retries": 1, "time": "01:00:00",
              "wait": True}  # the loop waits for each array: the next stage reads its table
    assert execution == {"generate": common, "score": {**common, "gpus_per_task": 2},
                         "correct": common}
    body["executor"] = {"executor": "ray", "gpu_per_task": 1}
    with pytest.raises(ValueError, match=r"recipe generate executor: unknown executor "
                       r"option\(s\) \['gpu_per_task'\]"):
        run_loop(RunConfig(recipe=recipe_from_dict(body), out=str(tmp_path / "r"),
                           dry_run=True))
