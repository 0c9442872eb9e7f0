"""Group-relative advantages: grpo / dr_grpo, scale_rewards, prm_dense shaping, zero groups."""

from __future__ import annotations

import numpy as np
import pytest

from scope_data.advantages import (
    dense_step_advantages,
    group_advantages,
    resolve_scale_rewards,
    zero_groups,
)

R = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
G = ["a", "a", "a", "a", "b", "b", "b", "b"]


def test_grpo_group_scaling_by_hand() -> None:
    adv = group_advantages(R, G)
    std_a = np.std([1, 0, 0, 1], ddof=1)  # 0.5774
    a = 0.5 / (std_a + 1e-4)
    assert adv[:4] == pytest.approx([a, -a, -a, a])
    std_b = np.std([1, 0, 1, 1], ddof=1)  # 0.5
    assert adv[4] == pytest.approx(0.25 / (std_b + 1e-4))
    assert adv[5] == pytest.approx(-0.75 / (std_b + 1e-4))


def test_dr_grpo_and_batch_and_none() -> None:
    dr = group_advantages(R, G, "dr_grpo")
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, -0.75, 0.25, 0.25])
    assert group_advantages(R, G, "grpo", "none").tolist() == pytest.approx(dr.tolist())
    batch = group_advantages(R, G, "grpo", "batch")
    assert batch.tolist() == pytest.approx((dr / (np.std(R, ddof=1) + 1e-4)).tolist())


def test_scale_rewards_resolution() -> None:
    assert resolve_scale_rewards("grpo", None) == "group"
    assert resolve_scale_rewards("dr_grpo", None) == "none"
    with pytest.raises(ValueError, match="dr_grpo"):
        resolve_scale_rewards("dr_grpo", "group")
    with pytest.raises(ValueError, match="unknown"):
        resolve_scale_rewards("ppo", None)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([float("nan")], ["a"])


def test_uniform_and_singleton_groups_are_zero_and_counted() -> None:
    adv = group_advantages([1, 1, 0, 0, 1, 0.5], ["a", "a", "b", "b", "c", "d"])
    assert adv.tolist() == [0.0] * 6
    assert zero_groups(list(adv), ["a", "a", "b", "b", "c", "d"]) == {"a", "b", "c", "d"}
    mixed = group_advantages([1, 0, 1, 1], ["a", "a", "b", "b"])
    assert zero_groups(list(mixed), ["a", "a", "b", "b"]) == {"b"}


def test_prm_dense_formula() -> None:
    # group of two failed responses (A = 0) with step scores; centre = mean of all step scores
    spans = [[(0, 2, 0.9), (2, 4, 0.1)], [(0, 3, 0.8)], None]
    tok = dense_step_advantages([0.0, 0.0, 0.0], ["g", "g", "h"], spans, [5, 3, 2], alpha=2.0)
    c = (0.9 + 0.1 + 0.8) / 3
    assert tok[0].tolist() == pytest.approx(
        [2 * (0.9 - c)] * 2 + [2 * (0.1 - c)] * 2 + [0.0])  # token 4 is outside every step
    assert tok[1].tolist() == pytest.approx([2 * (0.8 - c)] * 3)
    assert tok[2].tolist() == [0.0, 0.0]  # unscored: keeps A_i
    # an all-failed group still has signal under prm_dense, but not without scores
    assert zero_groups(tok, ["g", "g", "h"]) == {"h"}
