"""The report's budget table: what each algorithm spent, summed over rounds, mean over runs."""

from __future__ import annotations

import polars as pl

from pipelines.loop.report import budget_table


def test_budget_sums_rounds_and_averages_runs() -> None:
    rows = []
    for algo, run, steps, teacher in [("scope", "s0", (2, 3), (10, 20)),
                                      ("scope", "s1", (4, 5), (30, 40)),
                                      ("grpo", "g0", (1, 1), (None, None))]:
        for r, (st, te) in enumerate(zip(steps, teacher, strict=True), start=1):
            rows.append({"algo": algo, "run": run, "round": r, "eval_set": "heldout",
                         "train_steps": st, "tokens_trained": 100 * st, "teacher_tokens": te,
                         "prm_tokens": None})
    text = budget_table(pl.DataFrame(rows))
    lines = text.splitlines()
    assert lines[0] == "| algo | train_steps | tokens_trained | teacher_tokens | prm_tokens |"
    assert lines[2] == "| grpo | 2 | 200 | 0 | 0 |"  # registry order: grpo before scope
    assert lines[3] == "| scope | 7 | 700 | 50 | 0 |"  # (5 + 9) / 2 steps, (30 + 70) / 2
