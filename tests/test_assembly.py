"""Group assembly from the corrected table: replacement, algos, zero groups, bad rows."""

from __future__ import annotations

import math

import numpy as np
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


def test_hand_made_order_and_advantages() -> None:
    """Rows interleaved across two groups: used, orphan and duplicate corrections."""
    fix = {"kind": "corrected", "off_policy_start": 1, "logprobs": [-1.0, NAN]}
    rows = [
        make_row("p2", "e", P, [1, 2], 0.0),
        make_row("p1", "a", P, [1, 2], 1.0),
        make_row("p1", "b", P, [1, 2], 0.0),
        make_row("p1", "c", P, [1, 2], 0.0),
        make_row("p1", "c-fix", P, [1, 3], 1.0, source="c", **fix),
        make_row("p2", "f", P, [1, 2], 1.0),
        make_row("p1", "d", P, [1, 2], 0.5),
        make_row("p2", "orphan", P, [1, 3], 1.0, source="gone", **fix),
        make_row("p1", "c-fix2", P, [1, 4], 1.0, source="c", **fix),  # duplicate source
    ]
    a = assemble(to_table(rows), algo="scope")
    assert a.rows["rollout_id"].to_list() == ["e", "f", "orphan", "a", "b", "d", "c-fix"]
    assert a.rows["group_id"].to_list() == ["p2:0"] * 3 + ["p1:0"] * 4
    assert a.rows["off_policy_start"].to_list() == [2, 2, 1, 2, 2, 2, 1]
    # p2: rewards (0, 1, 1), mean 2/3, std sqrt(1/3); p1: (1, 0, 0.5, 1), mean 0.625,
    # std sqrt(0.6875 / 3)
    s2, s1 = math.sqrt(1 / 3) + 1e-4, math.sqrt(0.6875 / 3) + 1e-4
    want = [-2 / 3 / s2, 1 / 3 / s2, 1 / 3 / s2,
            0.375 / s1, -0.625 / s1, -0.125 / s1, 0.375 / s1]
    assert a.rows["advantage"].to_list() == pytest.approx(want, rel=1e-6)
    assert {k: a.stats[k] for k in ("corrections_used", "corrections_orphan",
                                    "corrections_duplicate_source", "groups", "responses")} == {
        "corrections_used": 1, "corrections_orphan": 1, "corrections_duplicate_source": 1,
        "groups": 2, "responses": 7}


def test_duplicate_and_chained_rollout_ids_raise() -> None:
    rows = group() + [make_row("p1", "p1-ok", P, [1, 2], 0.0)]
    with pytest.raises(ValueError, match="p1-ok.*appears twice"):
        assemble(to_table(rows))
    rows = group() + [make_row("p1", "p1-fix2", P, [1, 2], 1.0, kind="corrected",
                               source="p1-fix", off_policy_start=1, logprobs=[-1.0, NAN])]
    with pytest.raises(ValueError, match="p1-fix2.*names another corrected row"):
        assemble(to_table(rows))


# -- randomized: assemble against a plain per-row reference -----------------------------------
def reference(rows: list[dict], algo: str, accepted: tuple[str, ...]) -> list[tuple]:
    """(group_id, rollout_id, off_policy_start, float32 advantage) per training row, built
    with dicts: corrections replace their sources in table order, groups in first-row order."""
    groups: dict[tuple, dict[str, dict]] = {}
    fixes = []
    for r in rows:
        key = (r["problem_id"], r["round"])
        if r["kind"] == "policy":
            groups.setdefault(key, {})[r["rollout_id"]] = r
        elif algo in ("scope", "luffy") and r["correct_status"] in accepted:
            fixes.append(r)
    replaced: set[str] = set()
    for r in fixes:
        group = groups.setdefault((r["problem_id"], r["round"]), {})
        if r["source_rollout_id"] not in replaced:
            group.pop(r["source_rollout_id"], None)
            replaced.add(r["source_rollout_id"])
            group[r["rollout_id"]] = r
    out = []
    for (pid, rnd), group in groups.items():
        rewards = np.array([r["reward"] for r in group.values()], dtype=np.float32).astype(float)
        if not rewards.size or not np.any(rewards != rewards[0]):
            continue  # empty or zero-advantage group
        std = np.std(rewards, ddof=1) if rewards.size > 1 else 0.0
        adv = (rewards - rewards.mean()) / (std + 1e-4)
        for r, x in zip(group.values(), adv, strict=True):
            n = len(r["response_token_ids"])
            if n:
                start = n if r["kind"] == "policy" else r["off_policy_start"]
                out.append((f"{pid}:{rnd}", r["rollout_id"], start, float(np.float32(x))))
    return out


def random_rows(rng: np.random.Generator) -> list[dict]:
    rows = []
    for p in range(int(rng.integers(1, 6))):
        for rnd in range(int(rng.integers(1, 3))):
            policy = [make_row(f"p{p}", f"p{p}-{s}", P, [1] * int(rng.integers(0, 5)),
                               float(rng.choice([0.0, 1.0, rng.random()])), round_=rnd)
                      for s in range(int(rng.integers(1, 10)))]
            rows += policy
            for src in policy:
                if rng.random() < 0.4:
                    n = int(rng.integers(0, 5))
                    source = src["rollout_id"] if rng.random() < 0.8 else "p0-0"
                    rows.append(make_row(
                        f"p{p}", f"fix-{len(rows)}", P, [2] * n, float(rng.random() < 0.7),
                        round_=rnd, kind="corrected", source=source, off_policy_start=n // 2,
                        logprobs=[-1.0] * (n // 2) + [NAN] * (n - n // 2),
                        correct_status=str(rng.choice(["accepted", "truncated",
                                                       "teacher_error"]))))
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.mark.parametrize("seed", range(3))
def test_assemble_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(15):
        rows = random_rows(rng)
        for algo in ("scope", "grpo"):
            got = assemble(to_table(rows), algo=algo).rows
            assert list(got.select("group_id", "rollout_id", "off_policy_start",
                                   "advantage").iter_rows()) == reference(
                rows, algo, ("accepted", "truncated", "rejected_wrong"))
