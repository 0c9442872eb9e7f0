"""Group-relative advantages: grpo / dr_grpo, scale_rewards, prm_dense shaping, zero groups."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from scope_data.advantages import (
    EPS,
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


def spans_frame(spans: list[list[tuple[int, int, float | None]] | None]) -> pl.DataFrame:
    """The `spans` argument of dense_step_advantages from per-response (start, end, score)."""
    rows = [{"row": i, "token_start": a, "token_end": b, "score": x}
            for i, steps in enumerate(spans) for a, b, x in steps or []]
    return pl.DataFrame(rows, schema={"row": pl.Int64, "token_start": pl.Int32,
                                      "token_end": pl.Int32, "score": pl.Float64})


def test_prm_dense_formula() -> None:
    # group of two failed responses (A = 0) with step scores; centre = mean of all step scores
    spans = [[(0, 2, 0.9), (2, 4, 0.1)], [(0, 3, 0.8)], None]
    tok = dense_step_advantages([0.0, 0.0, 0.0], ["g", "g", "h"], spans_frame(spans), [5, 3, 2],
                                alpha=2.0).to_list()
    c = (0.9 + 0.1 + 0.8) / 3
    assert tok[0] == pytest.approx(
        [2 * (0.9 - c)] * 2 + [2 * (0.1 - c)] * 2 + [0.0])  # token 4 is outside every step
    assert tok[1] == pytest.approx([2 * (0.8 - c)] * 3)
    assert tok[2] == [0.0, 0.0]  # unscored: keeps A_i
    # an all-failed group still has signal under prm_dense, but not without scores
    assert zero_groups(pl.Series(tok), ["g", "g", "h"]) == {"h"}


# -- randomized: the vectorised functions against per-group loops, bit for bit -----------------
def reference_advantages(r: np.ndarray, groups: list[str], scale: str) -> np.ndarray:
    adv = np.zeros_like(r)
    batch = np.std(r, ddof=1) if r.size > 1 else 0.0
    for g in set(groups):
        idx = np.flatnonzero(np.asarray(groups) == g)
        centred = r[idx] - r[idx].mean()
        if scale == "group":
            centred = centred / ((np.std(r[idx], ddof=1) if idx.size > 1 else 0.0) + EPS)
        elif scale == "batch":
            centred = centred / (batch + EPS)
        adv[idx] = centred
    return adv


def reference_dense(adv: np.ndarray, groups: list[str], spans: list, lengths: list[int],
                    alpha: float) -> list[list[float]]:
    scored = [[(a, b, x) for a, b, x in s or [] if x is not None and np.isfinite(x)]
              for s in spans]
    centre = {g: float(np.mean([x for i, s in enumerate(scored) if groups[i] == g
                                for _, _, x in s] or [0.0])) for g in set(groups)}
    out = []
    for i, n in enumerate(lengths):
        tok = np.full(n, adv[i])
        for a, b, x in scored[i]:
            tok[max(0, a):min(n, b)] += alpha * (x - centre[groups[i]])
        out.append(tok.tolist())
    return out


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_matches_per_group_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(4 if seed == 0 else 20):
        sizes = rng.integers(1, 200 if seed == 0 else 12, int(rng.integers(1, 30)))
        groups = [f"g{g}" for g in rng.permutation(np.repeat(np.arange(sizes.size), sizes))]
        r = rng.random(len(groups)) * rng.choice([1e-3, 1.0, 1e3], len(groups))
        for estimator, scale in (("grpo", "group"), ("grpo", "batch"), ("dr_grpo", "none")):
            adv = group_advantages(r, groups, estimator, None if scale == "group" else scale)
            assert adv.tobytes() == reference_advantages(r, groups, scale).tobytes()
        lengths = rng.integers(0, 15, len(groups)).tolist()
        spans = []
        for n in lengths:
            ends = np.sort(rng.integers(-2, n + 3, 2 * int(rng.integers(0, 4))))
            spans.append([(int(a), int(b), rng.choice([float(rng.random()), None, np.nan]))
                          for a, b in ends.reshape(-1, 2)])
        tok = dense_step_advantages(adv, groups, spans_frame(spans), lengths, 0.7)
        assert tok.to_list() == reference_dense(adv, groups, spans, lengths, 0.7)
        live = {g for t, g in zip(tok.to_list(), groups, strict=True) if any(t)}
        assert zero_groups(tok, groups) == set(groups) - live
