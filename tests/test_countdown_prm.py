"""The learned tiny countdown PRM (`scope tiny-prm --task countdown`): its data are the tiny
countdown policy's own rollouts labelled by the process oracle, its inputs are the hf-cls
scoring engine's, and its stored held-out metrics are what scoring gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_countdown_prm_build_labels_inputs_and_metrics(tmp_path: Path, monkeypatch) -> None:
    from pipelines.engines import load_prm
    from pipelines.engines.prm_inputs import PRMInput
    from pipelines.tiny.countdown_prm import (
        EVAL_SEED_OFFSET,
        CountdownPRMConfig,
        build_countdown_prm,
        labelled_rollouts,
    )
    from scope_data.first_error import locate, subset_metrics
    from scope_data.tasks import countdown as cd
    from scope_data.tasks.arith import first_error_of

    small = {"problems": 60, "samples": 2, "max_steps": 20, "eval_problems": 40,
             "hidden_size": 64, "num_heads": 2, "intermediate_size": 128}
    cfg = CountdownPRMConfig(**small)
    rows = labelled_rollouts(cfg, 30, seed=5)
    assert len(rows) > 40
    for prompt, lines, verdicts in rows:  # labels are the oracle's, one per response line
        problem = cd.parse_prompt(prompt)
        assert verdicts == cd.check_steps(problem, "\n".join(lines))
    path = build_countdown_prm(tmp_path / "prm", num_threads=1, **small)
    meta = json.loads((path / "scope_tiny.json").read_text())
    assert meta["config_hash"] == cfg.hash() and meta["loads_as"] == "hf-cls:<this folder>"
    assert meta["data"]["right_labels"] > 0 and meta["data"]["wrong_labels"] > 0
    # the training encoder is the scoring engine's: one separator position per step
    prm = load_prm(f"hf-cls:{path}", device="cpu")
    assert isinstance(prm.input, PRMInput) and prm.input.family == "cls"
    ids, positions = prm.input.encode(rows[0][0], rows[0][1])
    assert len(positions) == len(rows[0][1]) and len(ids) > positions[-1]
    # the stored held-out metrics are what hf-cls scoring of that set gives
    held = labelled_rollouts(CountdownPRMConfig(**{**small, "samples": 1}), cfg.eval_problems,
                             cfg.seed + EVAL_SEED_OFFSET)
    preds = [locate(s, 0.5) for s in prm.score_batch([(p, lines) for p, lines, _ in held])]
    gold = [first_error_of(v, len(v)) for _, _, v in held]
    assert meta["eval"]["f1"] == pytest.approx(subset_metrics("x", preds, gold).f1, nan_ok=True)
    assert build_countdown_prm(tmp_path / "prm", num_threads=1, **small) == path  # reused
