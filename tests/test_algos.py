"""The algorithm registry: one record per algo, read by the loop, correct, train and report."""

from __future__ import annotations

import pytest

from scope_data.algos import (
    ALGO_NAMES,
    ALGOS,
    CORRECTION_MODES,
    get_algo,
    mode_needs_scores,
    training_input_error,
)


def test_registry_records() -> None:
    assert ALGO_NAMES == ("grpo", "luffy", "prm_dense", "scope")  # run, plot and table order
    assert CORRECTION_MODES == ("luffy", "scope")
    for a in ALGOS.values():
        assert a.description and a.trains_from
        assert set(a.trains_from) <= {"rollouts", "scored", "corrected"}
        # what a round feeds train: the last table its stages write
        last = "corrected" if a.uses_corrections else "scored" if a.uses_prm else "rollouts"
        assert a.trains_from[0] == last, a.name
    assert [n for n, a in ALGOS.items() if a.uses_prm] == ["prm_dense", "scope"]
    assert get_algo("prm_dense").prm_scores == "all" and get_algo("scope").prm_scores == "failed"
    assert get_algo("prm_dense").dense_rewards and not get_algo("scope").dense_rewards
    with pytest.raises(ValueError, match="unknown algo 'ppo'; use one of grpo, luffy"):
        get_algo("ppo")


def test_correction_modes() -> None:
    assert mode_needs_scores("scope") and not mode_needs_scores("luffy")
    with pytest.raises(ValueError, match="unknown correction mode"):
        mode_needs_scores("grpo")


def test_training_input_errors() -> None:
    assert training_input_error("scope", "corrected", "scope") is None
    assert training_input_error("scope", "corrected", None) is None  # mode not recorded
    assert training_input_error("grpo", "corrected", "luffy") is None
    assert training_input_error("grpo", "rollouts") is None
    assert "cannot train algo 'scope'" in training_input_error("scope", "scored")
    assert "cannot train algo 'prm_dense'" in training_input_error("prm_dense", "rollouts")
    assert "--mode luffy" in training_input_error("scope", "corrected", "luffy")
    assert "needs PRM scores" in training_input_error("prm_dense", "scored", unscored_rows=3)
    assert training_input_error("scope", "corrected", "scope", unscored_rows=3) is None


def test_score_config_follows_the_registry() -> None:
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_stages import correct_config, score_config

    def recipe(algo: str, **over: object):  # noqa: ANN202
        return recipe_from_dict({"name": "t", "algo": algo, "policy": "hf:/p",
                                 "problems": {"arith": {"count": 2, "seed": 1}},
                                 "eval": {"arith": {"count": 2, "seed": 2}}, **over})

    assert score_config(recipe("scope"), "r", "s").only_failed is True
    assert score_config(recipe("prm_dense"), "r", "s").only_failed is False
    assert score_config(recipe("scope", score={"only_failed": False}), "r", "s").only_failed \
        is False
    assert correct_config(recipe("luffy"), "r", "c", 1).mode == "luffy"
    assert correct_config(recipe("scope"), "s", "c", 1).mode == "scope"
