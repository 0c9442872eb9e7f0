"""`scope eval`: metrics from hand-made rollouts, and end to end with the tiny policy."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from pipelines.stages.evaluate import summarize


def _rollouts(groups: dict[str, list[tuple[str, bool]]]) -> pl.DataFrame:
    rows = []
    for pid, samples in groups.items():
        for i, (text, ok) in enumerate(samples):
            rows.append({"problem_id": pid, "sample_idx": i, "correct": ok,
                         "response_text": text, "response_token_ids": list(range(len(text))),
                         "finish_reason": "length" if text.endswith("...") else "stop",
                         "status": "ok"})
    return pl.DataFrame(rows)


def test_summarize_hand_made() -> None:
    df = _rollouts({
        "a": [("1 + 2 = 3", True), ("1 + 2 = 3", False), ("1 + 2 = 4...", False)],
        "b": [("x = 1", False), ("x = 1", False), ("x = 1", False)],
    })
    m, per = summarize(df)
    assert m["problems"] == 2 and m["samples"] == 6 and m["n"] == 3
    assert m["accuracy"] == pytest.approx(1 / 6)
    assert m["avg@n"] == pytest.approx((1 / 3 + 0) / 2)
    # problem a: n=3, c=1 -> pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert m["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["pass@2"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["pass@3"] == pytest.approx(0.5)
    assert m["truncation_rate"] == pytest.approx(1 / 6)
    lengths = [9, 9, 12, 5, 5, 5]
    assert m["mean_response_tokens"] == pytest.approx(sum(lengths) / 6)
    row_b = per.filter(pl.col("problem_id") == "b").row(0, named=True)
    assert row_b["self_bleu_div"] == pytest.approx(0.0)  # identical responses
    assert row_b["novel_equations"] == 0.0
    row_a = per.filter(pl.col("problem_id") == "a").row(0, named=True)
    # a: equations {1+2=3}, {1+2=3}, {1+2=4...}: only the third is novel -> mean 1/3
    assert row_a["novel_equations"] == pytest.approx(1 / 3)
    assert m["novel_equations"] == pytest.approx((1 / 3 + 0) / 2)
    assert 0 < row_a["self_bleu_div"] < 1


def test_summarize_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        summarize(pl.DataFrame(
            schema={"problem_id": pl.String, "sample_idx": pl.Int32, "correct": pl.Boolean,
                    "response_text": pl.String, "response_token_ids": pl.List(pl.Int32),
                    "finish_reason": pl.String, "status": pl.String}))


@pytest.mark.slow
def test_scope_eval_end_to_end(tmp_path, tiny_policy) -> None:
    """The CLI writes metrics.json / per_problem / samples consistent with the rollouts."""
    from typer.testing import CliRunner

    from cli.main import app
    from pipelines.loop.round_inputs import ProblemsConfig, write_problems
    from scope_data.shards import scan

    problems = tmp_path / "problems"
    write_problems(ProblemsConfig(out=str(problems), count=6, seed=3))
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, [
        "eval", "--model", f"hf:{tiny_policy}", "--problems", str(problems), "--out", str(out),
        "--n", "3", "--temperature", "1.0", "--max-new-tokens", "80", "--seed", "5", "--json",
    ])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    rollouts = scan(str(out / "rollouts")).collect()
    assert rollouts.height == 18 and metrics["samples"] == 18 and metrics["problems"] == 6
    assert metrics["accuracy"] == pytest.approx(rollouts["correct"].cast(pl.Float64).mean())
    per = pl.read_parquet(out / "per_problem.parquet")
    assert per.height == 6 and set(per["problem_id"]) == set(rollouts["problem_id"])
    for row in per.iter_rows(named=True):
        n, c = row["n"], row["c"]
        assert row["pass@3"] == (1.0 if c else 0.0)
        assert row["pass@1"] == pytest.approx(c / n)
        assert row["pass@2"] == pytest.approx(1 - math.comb(n - c, 2) / math.comb(n, 2))
    samples = pl.read_parquet(out / "samples.parquet")
    assert samples.height == 18
    key = ["problem_id", "sample_idx"]
    assert samples.sort(key)["correct"].to_list() == rollouts.sort(key)["correct"].to_list()
    # rerun: rollouts reused (same config), identical metrics
    res2 = CliRunner().invoke(app, [
        "eval", "--model", f"hf:{tiny_policy}", "--problems", str(problems), "--out", str(out),
        "--n", "3", "--temperature", "1.0", "--max-new-tokens", "80", "--seed", "5", "--json",
    ])
    assert res2.exit_code == 0, res2.output
    again = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "config"} == {
        k: v for k, v in metrics.items() if k != "config"}


def test_scope_eval_bad_problems(tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["eval", "--model", "hf:/nonexistent", "--problems",
                                   str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "nope" in res.output


def test_eval_engine_options_reach_its_generate_stage(tmp_path) -> None:
    from pipelines.stages.evaluate import EvalConfig, generate_config

    cfg = EvalConfig(model="vllm:/m", problems=str(tmp_path / "p"), out=str(tmp_path / "e"),
                     max_model_len=256, engine_kwargs={"enforce_eager": True})
    gen = generate_config(cfg)
    assert gen.engine_kwargs == {"enforce_eager": True} and gen.max_model_len == 256
    assert gen.engine_options()["enforce_eager"] is True
