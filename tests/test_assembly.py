"""Group assembly from the corrected table: replacement, algos, zero groups, bad rows."""

from __future__ import annotations

import pytest

from scope_data.assembly import assemble
from tests.helpers_train import NAN, make_row, to_table

P = [5, 6, 7]


def group(problem: str = "p1", round_: int = 0, with_orphan: bool = False) -> list[dict]:
    """3 rollouts (rewards 1, 0, 0); rollout f2 is corrected (prefix 2 tokens, reward 1)."""
    rows = [
        make_row(problem, f"{problem}-ok", P, [10, 11, 12], 1.0, round_=round_),
        make_row(problem, f"{problem}-f1", P, [10, 13, 14, 15], 0.0, round_=round_),
        make_row(problem, f"{problem}-f2", P, [10, 16, 17], 0.0, round_=round_,
                 correct_status="accepted"),
        make_row(problem, f"{problem}-fix", P, [10, 16, 20, 21, 22], 1.0, round_=round_,
                 kind="corrected", source=f"{problem}-f2", off_policy_start=2,
                 logprobs=[-1.0, -1.0, NAN, NAN, NAN]),
    ]
    if with_orphan:
        rows.append(make_row(problem, f"{problem}-fix9", P, [9, 9], 1.0, round_=round_,
                             kind="corrected", source="gone", off_policy_start=0,
                             logprobs=[NAN, NAN]))
    return rows


def test_scope_replaces_source_by_correction() -> None:
    a = assemble(to_table(group()), algo="scope", estimator="dr_grpo")
    rows = {r["rollout_id"]: r for r in a.rows.iter_rows(named=True)}
    assert set(rows) == {"p1-ok", "p1-f1", "p1-fix"}
    # rewards (1, 0, 1): mean 2/3
    assert rows["p1-fix"]["advantage"] == pytest.approx(1 / 3, rel=1e-6)
    assert rows["p1-f1"]["advantage"] == pytest.approx(-2 / 3, rel=1e-6)
    assert rows["p1-fix"]["off_policy_start"] == 2
    assert rows["p1-ok"]["off_policy_start"] == 3  # policy rows: all on-policy
    assert a.stats["corrections_used"] == 1
    assert a.stats["off_policy_tokens"] == 3 and a.stats["on_policy_tokens"] == 3 + 4 + 2


def test_grpo_ignores_corrections() -> None:
    a = assemble(to_table(group()), algo="grpo", estimator="dr_grpo")
    ids = set(a.rows["rollout_id"].to_list())
    assert ids == {"p1-ok", "p1-f1", "p1-f2"}
    assert a.stats["corrections_ignored_by_algo"] == 1
    assert a.rows["advantage"].to_list() == pytest.approx([2 / 3, -1 / 3, -1 / 3], rel=1e-6)


def test_groups_are_per_problem_and_round_and_zero_groups_skipped() -> None:
    allgood = [make_row("p2", f"g{i}", P, [1, 2], 1.0) for i in range(3)]
    a = assemble(to_table(group("p1", 0) + group("p1", 1) + allgood), algo="luffy")
    assert a.stats["groups"] == 3 and a.stats["groups_zero_advantage"] == 1
    assert a.stats["groups_trained"] == 2
    assert set(a.rows["group_id"].to_list()) == {"p1:0", "p1:1"}
    kept = assemble(to_table(allgood), keep_zero_groups=True)
    assert kept.rows["advantage"].to_list() == [0.0, 0.0, 0.0]


def test_rejected_statuses_and_orphans_counted() -> None:
    rows = group(with_orphan=True)
    rows[3]["correct_status"] = "teacher_error"
    a = assemble(to_table(rows), algo="scope", accepted_statuses=("accepted",))
    assert a.stats["corrections_rejected_teacher_error"] == 1
    assert a.stats["corrections_orphan"] == 1
    assert "p1-f2" in a.rows["rollout_id"].to_list()  # not replaced


def test_prm_dense_token_advantages() -> None:
    rows = [make_row("p", f"r{i}", P, [1, 2, 3, 4], 0.0,
                     steps=[{"text": "a", "char_start": 0, "char_end": 1, "token_start": 0,
                             "token_end": 2, "score": s},
                            {"text": "b", "char_start": 2, "char_end": 3, "token_start": 2,
                             "token_end": 4, "score": 0.2}])
            for i, s in enumerate((0.9, 0.5))]
    a = assemble(to_table(rows), algo="prm_dense", prm_alpha=1.0)
    tok = a.rows["token_advantages"].to_list()
    c = (0.9 + 0.2 + 0.5 + 0.2) / 4
    assert tok[0] == pytest.approx([0.9 - c] * 2 + [0.2 - c] * 2, abs=1e-6)
    assert tok[1] == pytest.approx([0.5 - c] * 2 + [0.2 - c] * 2, abs=1e-6)
    assert a.stats["groups_trained"] == 1  # all failed, yet dense shaping gives a gradient


def test_bad_rows_name_the_rollout() -> None:
    rows = group()
    rows[3]["off_policy_start"] = None
    with pytest.raises(ValueError, match="p1-fix.*without off_policy_start"):
        assemble(to_table(rows), algo="scope")
    rows = group()
    rows[1]["behaviour_logprobs"] = [-1.0]
    with pytest.raises(ValueError, match="p1-f1.*behaviour_logprobs"):
        assemble(to_table(rows))
    rows = group()
    rows[3]["off_policy_start"] = 9
    with pytest.raises(ValueError, match="outside"):
        assemble(to_table(rows), algo="scope")
    with pytest.raises(ValueError, match="unknown algo"):
        assemble(to_table(group()), algo="ppo")


def test_empty_table() -> None:
    from scope_data.schema import empty_table

    a = assemble(empty_table("corrected"))
    assert a.rows.height == 0 and a.stats["groups"] == 0
