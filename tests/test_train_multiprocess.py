"""`accelerate launch` with 2 CPU processes (gloo DDP) gives the loss curve of one process with
the same global batch: the loss divisor is counted over the whole optimizer step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.helpers_engines import build_random_tiny
from tests.helpers_train import scope_group, write_corrected

REPO = Path(__file__).resolve().parents[1]


def _train(cmd_prefix: list[str], data: str, policy: Path, out: Path, per_device: int,
           accum: int, extra: list[str]) -> pl.DataFrame:
    cmd = cmd_prefix + [
        "train", "--data", data, "--policy", str(policy), "--out", str(out),
        "--per-device-batch-size", str(per_device), "--grad-accum", str(accum), "--lr", "1e-3",
        "--epochs", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return pl.read_parquet(out / "train_metrics.parquet")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = build_random_tiny(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    # groups of different lengths, so token_mean needs the global token count to agree
    rows = [r for p in ("1", "23", "4", "56") for r in scope_group(tok, model, p,
                                                                     off_start=4 + len(p))]
    for i, r in enumerate(rows):  # behaviour log-probs off the trainer's by 0, .1 or .2 nats
        r["behaviour_logprobs"] = [x - 0.1 * ((i + t) % 3)
                                   for t, x in enumerate(r["behaviour_logprobs"])]
    data = write_corrected(tmp_path / "corrected", rows)
    python = [sys.executable, "-m", "cli.main"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "cli.main"]
    # global batch 4 = 1 process x 2 x grad-accum 2 = 2 processes x 1 x grad-accum 2
    # the mismatch correction: its max/min statistics combine across processes too
    extra = ["--use-cpu", "--old-logprobs", "recompute", "--vllm-importance-sampling-correction",
             "--vllm-importance-sampling-mode", "token_truncate"]
    one = _train(python, data, policy, tmp_path / "one", 2, 2, extra)
    two = _train(accelerate, data, policy, tmp_path / "two", 1, 2, extra)
    assert one.height == two.height == 6  # 12 responses / 4 per step x 2 epochs
    assert one["is_ratio_max"].max() > 1.1 and one["is_ratio_min"].min() == pytest.approx(1.0)
    for col in ("loss", "grad_norm", "clip_fraction", "off_policy_share", "tokens",
                "is_ratio_mean", "is_ratio_min", "is_ratio_max", "sampling_logp_difference_max",
                "behaviour_kl_k3"):
        assert two[col].to_list() == pytest.approx(one[col].to_list(), rel=1e-4, abs=1e-6), col
    assert len(set(one["loss"].round(6).to_list())) > 1  # the curve moves
    # a second call continuing each run's trainer state: DDP resumes like one process does
    one2 = _train(python, data, tmp_path / "one", tmp_path / "one2", 2, 2,
                  ["--use-cpu", "--resume-from", str(tmp_path / "one")])
    two2 = _train(accelerate, data, tmp_path / "two", tmp_path / "two2", 1, 2,
                  ["--use-cpu", "--resume-from", str(tmp_path / "two")])
    assert one2["step"].to_list() == two2["step"].to_list() == list(range(7, 13))
    for col in ("loss", "grad_norm", "tokens"):
        assert two2[col].to_list() == pytest.approx(one2[col].to_list(), rel=1e-4, abs=1e-6), col
