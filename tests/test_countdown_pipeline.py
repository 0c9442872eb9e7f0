"""The countdown task end to end: `scope problems countdown` -> `scope generate` (a tiny hf
policy) -> `scope score --prm rule:countdown` -> `scope correct --teacher oracle:countdown` ->
`scope eval`, the specs `rule:countdown`, `oracle:countdown`, `noisy:<prm>?f1=F&seed=S`, and
the noisy PRM's calibration measured by `scope prm-eval`'s ProcessBench F1."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipelines.engines.base import load_prm
from pipelines.engines.spec import SpecError, noisy_params, parse_model, parse_spec, resolve
from pipelines.engines.teachers import TeacherItem, load_teacher
from pipelines.stages.evaluate import summarize
from pipelines.stages.prm_eval import PRMEvalConfig, evaluate
from pipelines.stages.prm_eval import run as prm_eval_run
from scope_data.benchmarks import Benchmark
from scope_data.label_noise import decisive_steps, flip_rate, noisy_labels
from scope_data.shards import scan
from scope_data.tasks import countdown as cd
from scope_data.tasks import gold_first_error, solution_path

runner = CliRunner()
EXAMPLE = cd.CountdownProblem(numbers=(3, 7, 2, 9), target=4, modulus=10)


def test_specs_resolve_and_refuse() -> None:
    assert str(parse_spec("rule:countdown", "prm")) == "rule:countdown"
    assert str(parse_spec("oracle:countdown", "teacher")) == "oracle:countdown"
    spec = parse_spec("noisy:rule:countdown?f1=0.7&seed=3", "prm")
    inner, params = noisy_params(spec)
    assert (str(inner), params) == ("rule:countdown", {"seed": 3, "f1": 0.7})
    assert noisy_params(parse_spec("noisy:rule:arith?f1=1", "prm"))[1] == {"seed": 0, "f1": 1.0}
    assert resolve(parse_spec("noisy:hf-cls:/m/prm?f1=0.5", "prm")).model_path == "/m/prm"
    assert parse_model("noisy:rule:arith?f1=0.5").kind == "noisy"
    for bad, match in [("rule:math", "arith, countdown"), ("oracle:gsm8k", "arith, countdown"),
                       ("noisy:rule:arith", "must look like"), ("noisy:rule:arith?f1=2", "f1 in"),
                       ("noisy:rule:arith?f1=x", "must be a number"),
                       ("noisy:rule:arith?f1=.5&f1=.6", "bad parameter 'f1=.6'"),
                       ("noisy:rule:arith?f1=.5&temp=1", "bad parameter 'temp=1'"),
                       ("noisy:oops?f1=.5", "unknown prm engine spec 'oops'")]:
        with pytest.raises(SpecError, match=match):
            parse_spec(bad, "prm" if not bad.startswith("oracle") else "teacher")


def test_rule_countdown_prm_matches_the_process_oracle() -> None:
    prm = load_prm("rule:countdown")
    prompt = EXAMPLE.prompt
    solution = ["7 * 3 = 1", "2 - 9 = 3", "3 + 1 = 4", "Answer: 4"]
    assert prm.score(prompt, solution) == [1.0] * 4
    assert prm.score(prompt, ["7 + 3 = 0", "9 - 2 = 7"]) == [0.0, 0.0]  # dead end
    assert prm.score(prompt, ["5 + 3 = 8"]) == [0.0]  # no 5
    assert prm.score(prompt, ["7 * 3 = 2"]) == [0.0]  # 21 = 1 mod 10
    # a step of two lines is right iff both are; a blank step is NaN
    got = prm.score(prompt, ["7 * 3 = 1\n2 - 9 = 3", " ", "3 + 2 = 5"])
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == 0.0
    with pytest.raises(ValueError, match="not a countdown prompt"):
        prm.score("Mod 10. Start with 1. Add 2.", ["1 + 2 = 3"])


def test_oracle_countdown_teacher_is_valid_seeded_and_diverse() -> None:
    teacher = load_teacher("oracle:countdown")
    assert teacher.name == "oracle:countdown" and teacher.deterministic
    row = {"prompt": EXAMPLE.prompt}
    items = [TeacherItem(row, "7 * 3 = 1\n", [], 1, seed=s) for s in range(40)]
    outs = teacher.continue_batch(items)
    assert all(o.status == "ok" for o in outs)
    assert all(cd.is_valid_solution(EXAMPLE, "7 * 3 = 1\n" + o.text) for o in outs)
    assert len({o.text for o in outs}) == cd.count_solutions(EXAMPLE, (1, 2, 9)) == 6
    again = teacher.continue_batch(items[:5])
    assert [o.text for o in again] == [o.text for o in outs[:5]]  # same seed, same text
    bad = teacher.continue_batch([TeacherItem(row, "7 + 3 = 0\n", [], 1),
                                  TeacherItem({"prompt": "hello"}, "", [], 0)])
    assert [o.status for o in bad] == ["teacher_error"] * 2
    assert "oracle:countdown" in bad[0].detail and "step 0" in bad[0].detail


def test_flip_rate_and_noisy_labels_by_hand() -> None:
    assert flip_rate(0, 0.3) == 0.0 and flip_rate(1, 0.7) == pytest.approx(0.3)
    assert flip_rate(2, 0.49) == pytest.approx(0.3)  # (1 - 0.3)^2 = 0.49
    assert decisive_steps([1.0, math.nan, 1.0, 0.0, 1.0]) == 3
    assert decisive_steps([1.0, 1.0]) == 2 and decisive_steps([math.nan]) == 0
    assert noisy_labels([0.9, 0.2, math.nan], 1.0, random.Random(0))[:2] == [1.0, 0.0]
    flipped = noisy_labels([0.9, 0.2, math.nan], 0.0, random.Random(0))
    assert flipped[:2] == [0.0, 1.0] and math.isnan(flipped[2])  # rate 1: every label flips
    # P(no decisive label flipped) = f1: measured over many draws of a 4-step item
    rng = random.Random(1)
    kept = sum(noisy_labels([1, 1, 1, 1], 0.6, rng) == [1, 1, 1, 1] for _ in range(20_000))
    assert kept / 20_000 == pytest.approx(0.6, abs=0.015)


def _countdown_bench(n: int, seed: int) -> Benchmark:
    """n countdown responses, half valid solutions, half with one injected error (slip or dead
    end), gold = the process oracle's first error."""
    rng = random.Random(seed)
    items = []
    for i, p in enumerate(cd.generate_problems(n, seed=seed)):
        if i % 2:
            text, gold = cd.inject_error(p, rng)
        else:
            text, gold = cd.oracle_continue(p, "", rng=rng), -1
        assert gold_first_error("countdown", p.prompt, text) == gold
        items.append((p.prompt, text.split("\n"), gold))
    return Benchmark("countdown", "generated", items)


@pytest.mark.parametrize("f1", [0.3, 0.5, 0.7, 0.9])
def test_noisy_prm_hits_its_target_f1_on_1000_rollouts(f1: float) -> None:
    bench = _countdown_bench(1000, seed=11)
    exact = evaluate(load_prm("rule:countdown"), [bench])
    assert exact.average_f1 == 100.0
    noisy = load_prm(f"noisy:rule:countdown?f1={f1}&seed=3")
    result = evaluate(noisy, [bench])
    assert result.prm == f"noisy:rule:countdown?f1={f1}&seed=3"
    assert abs(result.average_f1 / 100 - f1) < 0.05
    # both accuracies sit near f1 (the per-item calibration), and the noise is seeded
    sub = result.subsets[0]
    assert abs(sub.acc_erroneous / 100 - f1) < 0.06 and abs(sub.acc_correct / 100 - f1) < 0.06
    assert evaluate(load_prm(f"noisy:rule:countdown?f1={f1}&seed=3"), [bench]).predictions == \
        result.predictions
    assert evaluate(load_prm(f"noisy:rule:countdown?f1={f1}&seed=4"), [bench]).predictions != \
        result.predictions


def test_noisy_arith_prm_f1() -> None:
    from scope_data.tasks import arith

    rng = random.Random(5)
    items = []
    for i, p in enumerate(arith.generate_problems(1000, seed=5)):
        text, gold = arith.inject_error(p, rng) if i % 3 else (p.solution, -1)
        items.append((p.prompt, text.split("\n"), gold))
    result = evaluate(load_prm("noisy:rule:arith?f1=0.6&seed=1"), [Benchmark("a", "x", items)])
    assert abs(result.average_f1 / 100 - 0.6) < 0.05


def test_summarize_path_diversity() -> None:
    sols = [cd.oracle_continue(EXAMPLE, "", rng=s) for s in range(3)]
    other = cd.CountdownProblem((1, 2), 3, 10)
    rows = {
        "problem_id": ["a"] * 4 + ["b"] * 2,
        "sample_idx": [0, 1, 2, 3, 0, 1],
        "task": ["countdown"] * 6,
        "prompt": [EXAMPLE.prompt] * 4 + [other.prompt] * 2,
        "correct": [True, True, True, False, False, False],
        "response_text": [sols[0], sols[0], sols[1], "Answer: 4", "x", "y"],
        "response_token_ids": [[1, 2]] * 6, "finish_reason": ["stop"] * 6,
        "status": ["ok"] * 6,
    }
    metrics, per = summarize(pl.DataFrame(rows))
    distinct = 1 if sols[0] == sols[1] else 2
    assert per["distinct_paths"].to_list() == [distinct, 0]
    entropy = 0.0 if distinct == 1 else -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert per["path_entropy"][0] == pytest.approx(entropy) and per["path_entropy"][1] is None
    assert metrics["distinct_paths"] == pytest.approx(distinct / 2)
    assert metrics["path_entropy"] == pytest.approx(entropy)
    arith_rows = {**rows, "task": ["arith"] * 6}
    metrics, per = summarize(pl.DataFrame(arith_rows))
    assert per["distinct_paths"].null_count() == 2 and metrics["distinct_paths"] is None


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_countdown_chain_problems_generate_score_correct_eval(tmp_path: Path,
                                                              tiny_policy: Path) -> None:
    p, r, s, c, e = (str(tmp_path / name) for name in ("p", "r", "s", "c", "e"))
    _ok(runner.invoke(app, ["problems", "countdown", "--count", "4", "--seed", "7",
                            "--max-solutions", "40", "--out", p]))
    problems = scan(p).collect()
    assert problems.height == 4 and set(problems["task"]) == {"countdown"}
    for row in problems.iter_rows(named=True):
        prob = cd.parse_prompt(row["prompt"])
        assert 1 <= cd.count_solutions(prob) <= 40 and row["answer"] == str(prob.target)
        assert cd.is_valid_solution(prob, row["solution"])
    policy = f"hf:{tiny_policy}"
    _ok(runner.invoke(app, ["generate", "--problems", p, "--policy", policy, "--out", r,
                            "--n", "4", "--max-new-tokens", "48", "--seed", "1"]))
    rollouts = scan(r).collect()
    assert rollouts.height == 16
    for row in rollouts.iter_rows(named=True):  # graded by the countdown verifier
        prob = cd.parse_prompt(row["prompt"])
        assert row["correct"] == (bool(row["response_text"].strip())
                                  and cd.is_correct(prob, row["response_text"]))
    _ok(runner.invoke(app, ["score", "--rollouts", r, "--out", s, "--prm", "rule:countdown"]))
    scored = scan(s).collect().filter(pl.col("score_status") == "ok")
    assert scored.height > 0
    for row in scored.iter_rows(named=True):  # newline steps, oracle verdicts
        lines = cd.response_lines(row["response_text"])
        assert [st["text"] for st in row["steps"]] == lines
        verdicts = cd.check_steps(cd.parse_prompt(row["prompt"]), row["response_text"])
        assert [st["score"] for st in row["steps"]] == [float(v) for v in verdicts]
    _ok(runner.invoke(app, ["correct", "--scored", s, "--out", c, "--teacher",
                            "oracle:countdown", "--min-prefix-steps", "0",
                            "--max-corrections-per-group", "4"]))
    corrected = scan(c).collect().filter(pl.col("kind") == "corrected")
    assert corrected.height > 0 and set(corrected["correct_status"]) == {"accepted"}
    for row in corrected.iter_rows(named=True):
        assert row["correct"] and row["teacher"] == "oracle:countdown"
        assert solution_path("countdown", row["prompt"], row["response_text"]) is not None
    _ok(runner.invoke(app, ["eval", "--model", policy, "--problems", p, "--out", e,
                            "--n", "3", "--max-new-tokens", "48", "--json"]))
    metrics = json.loads((Path(e) / "metrics.json").read_text())
    assert metrics["samples"] == 12 and "distinct_paths" in metrics
    per = pl.read_parquet(Path(e) / "per_problem.parquet")
    assert (per["distinct_paths"] <= per["c"]).all()
    # prm-eval on the countdown rollouts table: gold = the process oracle, exact PRM scores 100
    res = prm_eval_run(PRMEvalConfig(benchmarks=[r], prm="rule:countdown"))
    assert res.average_f1 == 100.0 or math.isnan(res.average_f1)
    noisy = "noisy:rule:countdown?f1=0.5&seed=2"
    shown = runner.invoke(app, ["prm-eval", "--benchmark", r, "--prm", noisy])
    _ok(shown)
    assert "noisy:rule:countdown" in shown.output


def test_problems_countdown_cli_and_table(tmp_path: Path) -> None:
    from scope_data.problems import countdown_table

    out = tmp_path / "cd"
    _ok(runner.invoke(app, ["problems", "countdown", "--count", "12", "--seed", "5",
                            "--numbers", "3", "--modulus", "7", "--min-solutions", "2",
                            "--max-solutions", "10", "--out", str(out)]))
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["rows"] == 12 and info["config"]["source"] == "countdown"
    assert info["config"]["min_solutions"] == 2 and info["config"]["max_solutions"] == 10
    table = scan(str(out)).collect()
    assert set(table["source"]) == {"countdown:seed=5"} and set(table["task"]) == {"countdown"}
    assert table["prompt"].n_unique() == 12
    for row in table.iter_rows(named=True):
        prob = cd.parse_prompt(row["prompt"])
        assert len(prob.numbers) == 3 and prob.modulus == 7
        assert 2 <= cd.count_solutions(prob) <= 10 and cd.is_valid_solution(prob, row["solution"])
    again = countdown_table(12, 5, numbers=3, modulus=7, min_solutions=2, max_solutions=10)
    assert again.to_pylist() == table.to_dicts()  # seeded: same table
    held_out = set(table["prompt"][:3])
    other = countdown_table(5, 5, numbers=3, modulus=7, min_solutions=2, max_solutions=10,
                            exclude_prompts=held_out)
    assert not held_out & set(other.column("prompt").to_pylist())
    bad = runner.invoke(app, ["problems", "countdown", "--numbers", "2", "--min-solutions", "9",
                              "--count", "1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "no problem with 9..None solutions" in bad.output


def test_tiny_countdown_config_and_training_texts() -> None:
    from pipelines.tiny.countdown import CountdownTinyConfig
    from pipelines.tiny.policy import TinyConfig, config_from_meta

    cfg = CountdownTinyConfig(num_examples=600)
    assert cfg.hash() != TinyConfig().hash() and cfg.hash() != CountdownTinyConfig().hash()
    assert config_from_meta({"config": cfg.to_dict()}) == cfg
    assert config_from_meta({"config": TinyConfig().to_dict()}) == TinyConfig()
    pairs = cfg.training_texts()
    assert pairs == cfg.training_texts() and len(pairs) == 600
    errors = [cd.first_error(cd.parse_prompt(p), c) for p, c in pairs]
    assert 0.24 < sum(e != -1 for e in errors) / 600 < 0.36  # error_rate 0.3
    assert len({c for (_, c), e in zip(pairs, errors, strict=True) if e == -1}) > 300
    held_out = cfg.eval_problems(50)
    assert len(held_out) == 50 and not {p.prompt for p in held_out} & {p for p, _ in pairs}


@pytest.mark.slow
def test_tiny_countdown_policy_short_build(tmp_path: Path, monkeypatch) -> None:
    """A very short build (the recipe's plumbing, not its accuracy): a model folder, its
    scope_tiny.json with the countdown config and a measured mix; the cache is reused."""
    from transformers import AutoModelForCausalLM

    from pipelines.tiny.countdown import CountdownTinyConfig, build_tiny_countdown_policy
    from pipelines.tiny.policy import load_meta, tiny_cache_dir

    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    short = {"max_steps": 3, "num_examples": 64, "hidden_size": 32, "intermediate_size": 64,
             "num_heads": 2, "head_dim": 16, "max_position_embeddings": 96}
    path = build_tiny_countdown_policy(eval_problems=4, num_threads=1, **short)
    assert path == tiny_cache_dir(CountdownTinyConfig(**short))
    meta = load_meta(path)
    assert meta["config"]["task"] == "countdown" and meta["train"]["steps"] == 3
    assert meta["mix"]["n"] == 4 and 0 <= meta["mix"]["correct_share"] <= 1
    assert AutoModelForCausalLM.from_pretrained(str(path)).config.hidden_size == 32
    assert build_tiny_countdown_policy(eval_problems=4, **short) == path  # cached
