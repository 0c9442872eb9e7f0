"""`scope study`: the plan, the paired bootstrap, the countdown recipe, and a small real study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipelines.loop.study import StudyConfig, plan, study_recipe
from pipelines.loop.study_report import paired_bootstrap


def test_paired_bootstrap_constant_and_null() -> None:
    d = np.full((5, 40), 0.25)
    mean, lo, hi = paired_bootstrap(d, 500)
    assert mean == lo == hi == pytest.approx(0.25)
    # +1/-1 per problem, the same on every seed: mean 0, the interval straddles 0
    d = np.tile(np.array([1.0, -1.0] * 50), (5, 1))
    mean, lo, hi = paired_bootstrap(d, 2000)
    assert mean == 0.0 and lo < 0 < hi
    # the half-width of a mean of 100 +-1 values is about 1.96 / sqrt(100) = 0.196
    assert hi - lo == pytest.approx(2 * 0.196, abs=0.04)


def test_paired_bootstrap_seed_noise_widens_the_interval() -> None:
    rng = np.random.default_rng(0)
    per_problem = rng.normal(0.1, 0.05, size=(1, 64))
    same = np.repeat(per_problem, 5, axis=0)
    shifted = same + np.array([[-0.3], [0.3], [-0.2], [0.2], [0.0]])  # seed effects, mean 0
    _, lo1, hi1 = paired_bootstrap(same, 1000)
    _, lo2, hi2 = paired_bootstrap(shifted, 1000)
    assert lo1 > 0 and (hi2 - lo2) > 5 * (hi1 - lo1)


def test_plan_runs_prm_free_algorithms_once_per_seed() -> None:
    cfg = StudyConfig(out="x", tasks=("countdown", "arith"), seeds=3, noisy_f1=(0.8, 0.5),
                      learned_prm=False)
    cells = plan(cfg)
    assert len(cells) == 6  # 2 tasks x 3 seeds
    names = [r.name for r in cells[0]]
    assert names == ["grpo-s0", "luffy-s0", "prm_dense.exact-s0", "prm_dense.noisy-0.8-s0",
                     "prm_dense.noisy-0.5-s0", "scope.exact-s0", "scope.noisy-0.8-s0",
                     "scope.noisy-0.5-s0"]
    noisy = next(r for r in cells[2] if r.name == "scope.noisy-0.5-s2")
    assert noisy.prm == "noisy:rule:countdown?f1=0.5&seed=2" and noisy.task == "countdown"
    assert {r.task for r in cells[3]} == {"arith"}
    with pytest.raises(ValueError, match="unknown study task"):
        plan(StudyConfig(out="x", tasks=("chess",), learned_prm=False))
    with pytest.raises(ValueError, match="noisy-f1"):
        plan(StudyConfig(out="x", noisy_f1=(1.5,), learned_prm=False))
    quick = StudyConfig(out="x", quick=True).resolved()
    assert (quick.tasks, quick.seeds, quick.rounds, quick.noisy_f1) == (("countdown",), 2, 2,
                                                                         (0.5,))


def test_study_recipes_equalise_updates_and_add_an_ood_set() -> None:
    cells = plan(StudyConfig(out="x", tasks=("countdown", "arith"), seeds=1, noisy_f1=(),
                             learned_prm=False))
    for cell in cells:
        for run in cell:
            recipe = study_recipe(run)
            assert recipe.algo == run.algo and recipe.prm == run.prm and recipe.seed == 0
            assert recipe.train["fixed_steps_per_round"] >= 1
            assert [e["name"] for e in recipe.eval] == ["heldout", "hard"]
    arith = study_recipe(cells[1][0])
    assert arith.eval[1]["arith"]["steps"] == [7, 8]


def test_countdown_recipe_problem_sets(tmp_path) -> None:
    from pipelines.loop.recipe import load_recipe
    from pipelines.loop.round_inputs import problems_config, write_problems
    from scope_data.tasks import countdown as cd

    recipe = load_recipe("countdown-tiny")
    train = problems_config(recipe.problems, str(tmp_path / "train"))
    write_problems(train)
    hard_entry = {**recipe.eval[1], "countdown": {**recipe.eval[1]["countdown"], "count": 20}}
    hard = problems_config(hard_entry, str(tmp_path / "hard"), exclude_from=str(tmp_path /
                                                                               "train"))
    write_problems(hard)
    t = pl.read_parquet(tmp_path / "train" / "*.parquet")
    h = pl.read_parquet(tmp_path / "hard" / "*.parquet")
    assert t.height == 64 and h.height == 20 and set(t["task"]) == set(h["task"]) == {"countdown"}
    assert not set(t["prompt"]) & set(h["prompt"])
    assert all(1 <= cd.count_solutions(cd.parse_prompt(p)) <= 24 for p in h["prompt"])
    with pytest.raises(ValueError, match="exactly one of"):
        load_recipe("countdown-tiny", {"problems": {"arith": {"count": 1}, "countdown": {}}})


@pytest.mark.slow
def test_small_study_end_to_end(tmp_path) -> None:
    """Two seeds of grpo and scope (exact + one noisy PRM), one round, countdown: real runs,
    CIs from the runs' own per-problem tables, study.md and plots written."""
    from pipelines.loop.study import run

    small = {"problems": {"countdown": {"count": 16, "seed": 101}},
             "eval": [{"name": "heldout", "countdown": {"count": 24, "seed": 20260}},
                      {"name": "hard", "countdown": {"count": 16, "seed": 20261,
                                                     "max_solutions": 24}, "every": 0}],
             "generate": {"n": 4, "temperature": 1.0, "max_new_tokens": 64},
             "evaluate": {"n": 4, "temperature": 0.6, "max_new_tokens": 64}}
    cfg = StudyConfig(out=str(tmp_path / "s"), tasks=("countdown",), algos=("grpo", "scope"),
                      seeds=2, rounds=1, noisy_f1=(0.5,), learned_prm=False, workers=2,
                      resamples=200, overrides=small)
    result = run(cfg)
    index = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [r["name"] for r in index["runs"]] == [
        "grpo-s0", "scope.exact-s0", "scope.noisy-0.5-s0",
        "grpo-s1", "scope.exact-s1", "scope.noisy-0.5-s1"]
    comp = result.comparisons
    acc = comp.filter((pl.col("metric") == "accuracy") & (pl.col("eval_set") == "heldout"))
    assert sorted(acc["setting"].to_list()) == ["exact", "noisy-0.5"]
    assert set(acc["baseline"]) == {"grpo"} and set(acc["seeds"]) == {2}
    assert (acc["ci_lo"] <= acc["mean_diff"]).all() and (acc["mean_diff"] <= acc["ci_hi"]).all()
    # the CI's mean is the difference of the two configs' final-round means
    final = result.final.filter(pl.col("eval_set") == "heldout")
    by = {r["config"]: r["accuracy"] for r in final.iter_rows(named=True)}
    exact = acc.filter(pl.col("setting") == "exact")["mean_diff"][0]
    assert exact == pytest.approx(by["scope.exact"] - by["grpo"], abs=1e-9)
    text = (tmp_path / "s" / "study.md").read_text()
    assert "Paired differences" in text
    assert "| countdown | heldout | noisy-0.5 | grpo | accuracy |" in text
    assert result.plots and all(Path(p).is_file() for p in result.plots)
    assert (tmp_path / "s" / "comparisons.csv").is_file()
    # budgets: the recipe's fixed_steps_per_round (8) for every run with something to train on
    # (grpo has nothing when every group's rollouts all failed: zero advantages are dropped)
    steps = dict(result.final.filter(pl.col("eval_set") == "heldout")
                 .select("config", "train_steps").iter_rows())
    assert steps["scope.exact"] == steps["scope.noisy-0.5"] == 8 and steps["grpo"] in (0, 8)
