"""Which failed rollouts get corrected (scope_data.groups, selection part)."""

from __future__ import annotations

import polars as pl
import pytest

from scope_data.groups import rescue_counts, select_corrections


def steps(starts: list[int]) -> list[dict]:
    return [{"text": "s", "char_start": 0, "char_end": 1, "token_start": a, "token_end": a + 1,
             "score": 1.0} for a in starts]


def row(pid: str, rid: str, idx: int, correct: bool, k: int | None, status: str = "ok",
        starts: tuple[int, ...] = (0, 4, 8, 12)) -> dict:
    return {"problem_id": pid, "rollout_id": rid, "sample_idx": idx, "correct": correct,
            "score_status": status, "first_error": k, "steps": steps(list(starts))}


ROWS = [
    row("a", "a0", 0, True, -1),
    row("a", "a1", 1, False, 1),
    row("a", "a2", 2, False, 3),  # latest first error in group a
    row("a", "a3", 3, False, 0),
    row("a", "a4", 4, False, 2),
    row("b", "b0", 0, False, 5),  # beyond the last step (4 steps: 0..3)
    row("b", "b1", 1, False, -1),
    row("b", "b2", 2, False, None, status="no_steps"),
    row("b", "b3", 3, False, 2),
    row("b", "b4", 4, False, 2, starts=(0, 4, 9, 12)),  # same k*, more kept tokens
    row("b", "b5", 5, True, None, status="skipped"),
    row("c", "c0", 0, False, 1, status="truncated"),  # error located before the PRM's limit
    row("c", "c1", 1, False, None, status="nan"),  # a NaN before any low step: undetermined
    row("d", "d0", 0, False, 4),  # unfinished: 4 right steps, the missing 5th is the error
]


def selection(**kw) -> dict[str, tuple[str, int | None]]:
    out = select_corrections(pl.DataFrame(ROWS), **kw)
    assert out["rollout_id"].to_list() == [r["rollout_id"] for r in ROWS]  # input order
    return {r: (s, k) for r, s, k in out.iter_rows()}


def test_scope_statuses_and_latest_first_error_wins() -> None:
    sel = selection()
    assert sel == {
        "a0": ("not_failed", None), "a1": ("over_group_limit", None),
        "a2": ("selected", 3), "a3": ("no_prefix", None), "a4": ("over_group_limit", None),
        "b0": ("first_error_out_of_range", None), "b1": ("prm_disagrees", None),
        "b2": ("not_scored", None), "b3": ("over_group_limit", None),
        "b4": ("selected", 2), "b5": ("not_failed", None),
        "c0": ("selected", 1), "c1": ("not_scored", None), "d0": ("selected", 4),
    }


def test_max_corrections_and_min_prefix_steps() -> None:
    sel = selection(max_corrections_per_group=2, min_prefix_steps=2)
    assert {r for r, (s, _) in sel.items() if s == "selected"} == {"a2", "a4", "b3", "b4", "d0"}
    assert sel["c0"] == ("prefix_too_short", None)
    assert sel["a1"] == ("prefix_too_short", None)
    assert sel["a3"] == ("no_prefix", None)
    sel = selection(max_corrections_per_group=10)
    assert {r for r, (s, _) in sel.items() if s == "selected"} == {"a1", "a2", "a4", "b3", "b4",
                                                                  "c0", "d0"}


def test_luffy_ignores_first_errors() -> None:
    sel = selection(mode="luffy", max_corrections_per_group=2)
    assert sel["a1"] == ("selected", 0) and sel["a2"] == ("selected", 0)
    assert sel["a3"][0] == sel["a4"][0] == "over_group_limit"
    assert sel["b0"] == ("selected", 0) and sel["b1"] == ("selected", 0)  # lowest sample_idx
    assert sel["a0"][0] == sel["b5"][0] == "not_failed"


def test_only_all_failed_corrects_groups_without_a_correct_response() -> None:
    sel = selection(only_all_failed=True, max_corrections_per_group=10)
    # groups a and b hold a verified response (a0, b5): their eligible failures are kept as is
    assert {r for r, (s, _) in sel.items() if s == "group_has_correct"} == {"a1", "a2", "a4",
                                                                           "b3", "b4"}
    assert sel["c0"] == ("selected", 1)  # group c has no correct response
    assert sel["a3"] == ("no_prefix", None) and sel["b1"] == ("prm_disagrees", None)
    luffy = selection(mode="luffy", only_all_failed=True)
    assert {r for r, (s, _) in luffy.items() if s == "selected"} == {"c0", "d0"}


def test_bad_options() -> None:
    df = pl.DataFrame(ROWS)
    with pytest.raises(ValueError, match="unknown correction mode 'grpo'"):
        select_corrections(df, mode="grpo")
    with pytest.raises(ValueError, match="max_corrections_per_group"):
        select_corrections(df, max_corrections_per_group=0)
    with pytest.raises(ValueError, match="missing columns"):
        select_corrections(df.drop("steps"))


def test_rescue_counts() -> None:
    table = pl.DataFrame({
        "problem_id": ["a", "a", "b", "b", "b", "c", "c"],
        "kind": ["policy", "policy", "policy", "policy", "corrected", "policy", "corrected"],
        "correct": [True, False, False, False, True, False, False],
    })
    assert rescue_counts(table) == {"groups": 3, "groups_all_failed": 2, "groups_rescued": 1}
