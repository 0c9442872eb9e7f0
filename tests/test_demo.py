"""`scope demo` on a tiny budget: every algo on the same seeds, the report and the table."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines.loop.report import final_table, load_runs, markdown_table

TINY_BUDGET = {
    "problems": {"arith": {"count": 4, "seed": 11}},
    "eval": [{"name": "heldout", "arith": {"count": 4, "seed": 12}}],
    "generate": {"n": 2, "temperature": 1.0, "max_new_tokens": 80},
    "correct": {"max_new_tokens": 80},
    "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_length": 96,
              "use_cpu": True},
    "evaluate": {"n": 2, "temperature": 1.0, "max_new_tokens": 80},
}


def _metrics(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows)


def test_final_table_mean_and_std(tmp_path) -> None:
    base = {"eval_set": "h", "n": 2, "pass@1": 0.5, "pass@2": 0.6, "self_bleu_div": 0.1,
            "novel_equations": 0.2, "distinct_4": 0.3, "salvage_rate": 0.25, "train_loss": 0.1,
            "first_error_hist": [3, 2, 1]}
    rows = []
    for algo, accs in (("scope", [0.4, 0.6]), ("grpo", [0.3, 0.3])):
        for seed, acc in enumerate(accs):
            rows.append({**base, "algo": algo, "seed": seed, "round": 0, "accuracy": 0.2})
            rows.append({**base, "algo": algo, "seed": seed, "round": 1, "accuracy": acc})
    for i, chunk in enumerate([rows[j:j + 2] for j in range(0, len(rows), 2)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        _metrics(chunk).write_parquet(d / "metrics.parquet")
    df = load_runs([str(tmp_path / f"run{i}") for i in range(4)])
    table = final_table(df, "h")
    assert table["algo"].to_list() == ["grpo", "scope"]  # baselines first, in registry order
    scope = table.filter(pl.col("algo") == "scope").row(0, named=True)
    assert scope["runs"] == 2 and scope["accuracy"] == pytest.approx(0.5)
    assert scope["accuracy_std"] == pytest.approx(pl.Series([0.4, 0.6]).std())
    md = markdown_table(table, {"accuracy": 0.2}, "algo")
    assert "| scope | 2 | 0.500 ± 0.141" in md and "| initial policy |" in md
    from pipelines.loop.report import report

    result = report([str(tmp_path / f"run{i}") for i in range(4)], str(tmp_path / "rep"))
    names = sorted(p.rsplit("/", 1)[-1] for p in result.plots)
    assert names == ["accuracy.png", "diversity.png", "first_error_hist.png", "pass_at_k.png",
                     "pass_at_k_curve.png", "salvage_rate.png", "train_loss.png"]
    for p in result.plots:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| scope | 2 | 0.500 ± 0.141" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_demo_tiny_budget(tmp_path, tiny_policy) -> None:
    from pipelines.loop.demo import DemoConfig
    from pipelines.loop.demo import run as demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), seeds=2, rounds=1, algos=("grpo", "scope"),
                     overrides=TINY_BUDGET)
    result = demo(cfg)
    assert len(result.run_dirs) == 4
    final = result.final
    assert final["algo"].to_list() == ["grpo", "scope"] and final["runs"].to_list() == [2, 2]
    report_dir = tmp_path / "demo"
    for name in ("report.md", "accuracy.png", "pass_at_k.png", "diversity.png",
                 "salvage_rate.png", "first_error_hist.png", "train_loss.png"):
        assert (report_dir / name).is_file(), name
    text = (report_dir / "report.md").read_text()
    assert "| grpo | 2 |" in text and "| scope | 2 |" in text and "Paired differences" in text
    df = load_runs(result.run_dirs)
    # same seed -> the same initial policy evaluation for every algo (computed once, shared)
    r0 = df.filter(pl.col("round") == 0).sort("seed", "algo")
    for seed in (0, 1):
        accs = r0.filter(pl.col("seed") == seed)["accuracy"].to_list()
        assert len(accs) == 2 and accs[0] == accs[1]
    # grpo never corrects, scope records its salvage rate
    last = df.filter(pl.col("round") == 1)
    assert last.filter(pl.col("algo") == "grpo")["salvage_rate"].null_count() == 2
    assert last.filter(pl.col("algo") == "scope")["salvage_rate"].null_count() == 0
    paired = result.paired
    assert set(paired["baseline"]) == {"grpo"} and paired["seeds"].to_list()[0] == 2
    acc = paired.filter(pl.col("metric") == "accuracy").row(0, named=True)
    s = last.filter(pl.col("algo") == "scope").sort("seed")["accuracy"]
    g = last.filter(pl.col("algo") == "grpo").sort("seed")["accuracy"]
    assert acc["mean_diff"] == pytest.approx((s - g).mean())
    # a rerun reuses every finished stage
    again = demo(cfg)
    assert again.final.equals(final)
