"""Stages on separate machines, simulated (issue 8, item 2).

`scope generate` runs as 3 shard jobs (`--num-shards 3 --shard-index k`, finishing in a random
order), then `scope score`, `scope correct` and `scope train`, each a separate OS process with its
own working directory, HOME, SCOPE_CACHE and HF_HOME. They share only the S3 endpoint (a moto
server on loopback), given by `--storage-options` or `$SCOPE_STORAGE_OPTIONS`. Each "machine"
holds its own copy of the policy at the same relative path `./policy`, as clusters hold a model
at the same mount path, so the policy spec (`hf:./policy`) and hence the stage config agree.
The downstream stage refuses to start while a generate part is missing, naming it. The same flow
runs within one process on `memory://`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scope_data.shards import ShardError, read_arrow, read_manifest

N_PROBLEMS, N_SAMPLES, MAX_NEW_TOKENS = 6, 2, 24


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """The policy every machine copies (a tiny random-init Qwen2 with the char tokenizer)."""
    from tests.helpers_engines import build_random_tiny

    return build_random_tiny(tmp_path_factory.mktemp("policy"), seed=3)


def write_problems(url: str, options: dict | None) -> None:
    from scope_data.problems import write_arith

    write_arith(url, count=N_PROBLEMS, seed=0, steps=(3, 4), modulus=10, storage_options=options)


class Machine:
    """A working directory with its own caches and its own copy of the policy."""

    def __init__(self, root: Path, name: str, policy: Path, storage: dict | None, via_env: bool):
        self.dir = root / name
        for sub in ("home", "cache", "hf"):
            (self.dir / sub).mkdir(parents=True)
        shutil.copytree(policy, self.dir / "policy")
        self.env = {**os.environ, "HOME": str(self.dir / "home"),
                    "SCOPE_CACHE": str(self.dir / "cache"), "HF_HOME": str(self.dir / "hf"),
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.env.pop("SCOPE_STORAGE_OPTIONS", None)
        self.flags: list[str] = []
        if storage is not None and via_env:
            self.env["SCOPE_STORAGE_OPTIONS"] = json.dumps(storage)
        elif storage is not None:
            self.flags = ["--storage-options", json.dumps(storage)]

    def scope(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args, *self.flags],
                              cwd=self.dir, env=self.env, capture_output=True, text=True,
                              timeout=600)


def generate_args(base: str, k: int) -> list[str]:
    return ["generate", "--problems", f"{base}/problems", "--policy", "hf:./policy",
            "--out", f"{base}/rollouts", "--n", str(N_SAMPLES), "--max-new-tokens",
            str(MAX_NEW_TOKENS), "--seed", "11", "--num-shards", "3", "--shard-index", str(k),
            "--batch-size", "4"]


def check_lineage(base: str, options: dict | None, train_out: Path) -> None:
    """Every table is complete, carries every upstream row, and refers to its input."""
    rollouts = read_arrow(f"{base}/rollouts", options)
    assert rollouts.num_rows == N_PROBLEMS * N_SAMPLES
    assert len(set(rollouts["rollout_id"].to_pylist())) == rollouts.num_rows
    scored = read_arrow(f"{base}/scored", options)
    assert sorted(scored["rollout_id"].to_pylist()) == sorted(rollouts["rollout_id"].to_pylist())
    corrected = read_arrow(f"{base}/corrected", options).to_pylist()
    policy_rows = [r["rollout_id"] for r in corrected if r["kind"] == "policy"]
    assert sorted(policy_rows) == sorted(rollouts["rollout_id"].to_pylist())
    assert any(r["kind"] == "corrected" and r["correct"] for r in corrected)
    for table, upstream in (("scored", "rollouts"), ("corrected", "scored")):
        ref = read_manifest(f"{base}/{upstream}", options)
        assert read_manifest(f"{base}/{table}", options).config["input"] == ref.content_hash
    manifest = json.loads((train_out / "train_manifest.json").read_text())
    assert manifest["inputs"][0]["content_hash"] == read_manifest(
        f"{base}/corrected", options).content_hash
    assert manifest["summary"]["steps"] >= 1
    assert (train_out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("order_seed", [0])
def test_stages_as_separate_processes_sharing_only_s3(tmp_path, s3_bucket, policy_dir,
                                                      order_seed):
    prefix, options = s3_bucket
    base = f"{prefix}-{uuid.uuid4().hex[:6]}"
    write_problems(f"{base}/problems", options)
    order = random.Random(order_seed).sample(range(3), 3)
    for i, k in enumerate(order):
        job = Machine(tmp_path, f"gen{k}", policy_dir, options, via_env=i % 2 == 0)
        done = job.scope(*generate_args(base, k))
        assert done.returncode == 0, done.stderr
        if i == 1:  # two of three parts exist: the scoring machine must refuse to start
            scorer = Machine(tmp_path, "early-score", policy_dir, options, via_env=True)
            early = scorer.scope("score", "--rollouts", f"{base}/rollouts", "--out",
                                 f"{base}/scored")
            missing = f"part-{order[2]:05d}-of-00003.parquet"
            assert early.returncode == 1
            assert "has not finished (2 of 3 parts done; missing: " + missing in early.stderr
            with pytest.raises(ShardError, match="no manifest"):
                read_manifest(f"{base}/scored", options)
    assert read_manifest(f"{base}/rollouts", options).num_shards == 3

    scorer = Machine(tmp_path, "score", policy_dir, options, via_env=False)
    done = scorer.scope("score", "--rollouts", f"{base}/rollouts", "--out", f"{base}/scored")
    assert done.returncode == 0, done.stderr
    corrector = Machine(tmp_path, "correct", policy_dir, options, via_env=True)
    done = corrector.scope("correct", "--scored", f"{base}/scored", "--out",
                           f"{base}/corrected", "--teacher", "oracle:arith",
                           "--min-prefix-steps", "0")
    assert done.returncode == 0, done.stderr
    trainer = Machine(tmp_path, "train", policy_dir, options, via_env=False)
    done = trainer.scope("train", "--data", f"{base}/corrected", "--policy", "hf:./policy",
                         "--out", "trained", "--max-steps", "2", "--per-device-batch-size", "4",
                         "--lr", "1e-4", "--use-cpu")
    assert done.returncode == 0, done.stderr
    check_lineage(base, options, trainer.dir / "trained")
    # the trained weights moved away from the starting policy
    from safetensors.numpy import load_file

    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(trainer.dir / "trained" / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
def test_stages_in_one_process_on_memory_fs(tmp_path, policy_dir, monkeypatch):
    from pipelines.stages.correct import CorrectConfig
    from pipelines.stages.correct import run as correct
    from pipelines.stages.generate import GenerateConfig
    from pipelines.stages.generate import run as generate
    from pipelines.stages.score import ScoreConfig
    from pipelines.stages.score import run as score
    from pipelines.training.train import TrainConfig
    from pipelines.training.train import run as train

    base = f"memory://scope-clusters-{uuid.uuid4().hex[:8]}"
    write_problems(f"{base}/problems", None)
    shutil.copytree(policy_dir, tmp_path / "policy")
    monkeypatch.chdir(tmp_path)
    order = random.Random(1).sample(range(3), 3)
    for i, k in enumerate(order):
        result = generate(GenerateConfig(
            problems=f"{base}/problems", policy="hf:./policy", out=f"{base}/rollouts",
            n=N_SAMPLES, max_new_tokens=MAX_NEW_TOKENS, seed=11, num_shards=3, shard_index=k,
            batch_size=4), quiet=True)
        assert (result.manifest is None) == (i < 2)
        if i == 1:
            missing = f"part-{order[2]:05d}-of-00003.parquet"
            with pytest.raises(ShardError, match=f"2 of 3 parts done; missing: {missing}"):
                score(ScoreConfig(rollouts=f"{base}/rollouts", out=f"{base}/scored"), quiet=True)
    score(ScoreConfig(rollouts=f"{base}/rollouts", out=f"{base}/scored"), quiet=True)
    correct(CorrectConfig(scored=f"{base}/scored", out=f"{base}/corrected",
                          teacher="oracle:arith", min_prefix_steps=0))
    train(TrainConfig(data=f"{base}/corrected", policy="hf:./policy",
                      output_dir=str(tmp_path / "trained"), max_steps=2,
                      per_device_train_batch_size=4, learning_rate=1e-4, use_cpu=True))
    check_lineage(base, None, tmp_path / "trained")
