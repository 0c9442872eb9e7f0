"""The analysis of `scope study`: final tables, paired bootstrap CIs, costs, plots, `study.md`.

Paired bootstrap (per task, eval set, PRM setting, baseline and metric): d[s, p] is the target's
per-problem value minus the baseline's on problem p of seed s, both after the last round (the
same held-out problems, evaluated with the same sampling seeds). A resample draws S seeds and P
problems with replacement and averages d over the drawn grid; the 95% interval is the 2.5 and
97.5 percentiles of `resamples` such means. It covers both seed-to-seed training noise and the
finite held-out set. Per-problem values: accuracy c/n, pass@n, distinct_paths and path_entropy
of the correct responses (0 when a group has none: no right path is no diversity of right
paths), 1 - self-BLEU of the whole group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.loop.report import eval_sets, fmt, load_runs, make_plots, round_rows

METRICS = ("accuracy", "pass@max", "distinct_paths", "path_entropy", "self_bleu_div")
COSTS = ("rollouts", "train_steps", "teacher_tokens", "prm_tokens")
PROBES = ("train_accuracy", "salvage_rate", "kept_prefix_steps", "groups_zero_advantage",
          "mean_entropy", "off_policy_share")


@dataclass
class StudyResult:
    out: str
    markdown: str
    comparisons: pl.DataFrame  # one row per (task, eval_set, setting, baseline, metric)
    final: pl.DataFrame        # one row per (task, eval_set, config): mean and std over seeds
    plots: list[str]


def paired_bootstrap(diff: np.ndarray, resamples: int, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``diff`` (seeds x problems) and its 95% bootstrap interval
    over seeds and problems drawn with replacement."""
    rng = np.random.default_rng(seed)
    s, p = diff.shape
    si = rng.integers(0, s, size=(resamples, s))
    pi = rng.integers(0, p, size=(resamples, p))
    means = diff[si[:, :, None], pi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def per_problem(folder: str, eval_set: str, last: int) -> pl.DataFrame:
    """A run's per-problem values (METRICS columns) on an eval set after round `last`."""
    path = Path(folder) / f"round-{last:04d}" / "eval" / eval_set / "per_problem.parquet"
    df = pl.read_parquet(path)
    n = int(df["n"].max())
    cols = [(pl.col("c") / pl.col("n")).alias("accuracy"), pl.col(f"pass@{n}").alias("pass@max")]
    for c in ("distinct_paths", "path_entropy"):  # no right answer: no right paths
        if c in df.columns:
            cols.append(pl.col(c).cast(pl.Float64).fill_null(0.0).alias(c))
    if "self_bleu_div" in df.columns:
        cols.append(pl.col("self_bleu_div"))
    return df.select("problem_id", *cols).with_columns(pl.lit(str(path)).alias("file"))


def compare(runs: list[Any], out: Path, last: int, eval_set: str, target: str, baseline: str,
            resamples: int) -> list[dict[str, Any]]:
    """Paired CIs of target - baseline (configs of one task's runs, matched by seed and
    problem_id) on the per-problem tables after round `last`."""
    mine = {r.seed: r for r in runs if r.config == target}
    base = {r.seed: r for r in runs if r.config == baseline}
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return []
    pairs = []
    for s in seeds:
        a = per_problem(str(mine[s].folder(out)), eval_set, last)
        b = per_problem(str(base[s].folder(out)), eval_set, last)
        joined = a.join(b, on="problem_id", how="full", suffix="_b", coalesce=True)
        if joined.height != a.height or joined.height != b.height:
            raise ValueError(f"{a['file'][0]} and {b['file'][0]}: different problems; a "
                             "paired comparison needs the same held-out set")
        pairs.append(joined.sort("problem_id"))
    rows = []
    for metric in METRICS:
        if metric not in pairs[0].columns:
            continue
        diff = np.stack([(j[metric] - j[f"{metric}_b"]).fill_null(float("nan")).to_numpy()
                         for j in pairs])
        if np.isnan(diff).any():
            raise ValueError(f"{pairs[0]['file'][0]}: {metric} is missing for some problems")
        mean, lo, hi = paired_bootstrap(diff, resamples)
        rows.append({"eval_set": eval_set, "target": target, "baseline": baseline,
                     "metric": metric, "seeds": len(seeds), "problems": diff.shape[1],
                     "mean_diff": mean, "ci_lo": lo, "ci_hi": hi,
                     "excludes_zero": bool(lo > 0 or hi < 0)})
    return rows


def analyse(cfg: Any, runs: list[Any], timings: list[dict[str, Any]], seconds: float
            ) -> StudyResult:
    """Tables, CIs, plots and `study.md` for the finished runs of a study."""
    out = Path(cfg.out)
    frames, comparisons, plots = [], [], []
    for task in dict.fromkeys(r.task for r in runs):
        mine = [r for r in runs if r.task == task]
        df = load_runs([str(r.folder(out)) for r in mine]).with_columns(
            pl.lit(task).alias("task"))
        config = {str(r.folder(out)): r.config for r in mine}
        df = df.with_columns(pl.col("run").replace_strict(config).alias("config"))
        frames.append(df)
        last = int(df.filter(pl.col("eval_set").is_not_null())["round"].max())
        settings = list(dict.fromkeys(r.setting for r in mine if r.setting != "-"))
        for eval_set in eval_sets(df):
            for setting in settings or ["-"]:
                target = cfg.target if setting == "-" else f"{cfg.target}.{setting}"
                for other in dict.fromkeys(config.values()):
                    algo, _, other_setting = other.partition(".")
                    if algo == cfg.target or (other_setting and other_setting != setting):
                        continue
                    for row in compare(mine, out, last, eval_set, target, other,
                                       cfg.resamples):
                        comparisons.append({"task": task, "setting": setting, **row})
        plots += _plots(df, out / task, settings)
    metrics = pl.concat(frames, how="diagonal_relaxed")
    comp = pl.DataFrame(comparisons) if comparisons else pl.DataFrame()
    final = final_table(metrics)
    prm_f1 = prm_quality(runs, out)
    text = markdown(cfg, final, comp, metrics, prm_f1, timings, seconds, plots)
    (out / "study.md").write_text(text)
    metrics.drop("first_error_hist", strict=False).write_csv(out / "metrics.csv")
    if comp.height:
        comp.write_csv(out / "comparisons.csv")
    print_summary(comp, final, out, seconds)
    return StudyResult(str(out), text, comp, final, plots)


def final_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """Mean and std over seeds of the last round, per (task, eval set, config); costs summed
    over rounds per run, then averaged."""
    last = metrics.filter((pl.col("round") == pl.col("round").max().over("run"))
                          & pl.col("eval_set").is_not_null())
    cols = [c for c in METRICS if c in last.columns]
    aggs: list[Any] = [pl.len().alias("seeds")]
    for c in cols:
        aggs += [pl.col(c).mean().alias(c), pl.col(c).std().alias(f"{c}_std")]
    table = last.group_by("task", "eval_set", "config", maintain_order=True).agg(aggs)
    cost_cols = [c for c in COSTS if c in metrics.columns]
    costs = (pl.concat([round_rows(t) for _, t in metrics.group_by("task")])
             .group_by("task", "config", "run").agg(pl.col(c).fill_null(0).sum() for c in cost_cols)
             .group_by("task", "config").agg(pl.col(c).mean() for c in cost_cols))
    return table.join(costs, on=["task", "config"], how="left")


def prm_quality(runs: list[Any], out: Path) -> dict[tuple[str, str], float]:
    """(task, setting) -> first-error F1 of that setting's PRM (the first seed's spec) on the
    round-1 training rollouts of the task's first run (the initial policy's own responses;
    gold: the task's process oracle)."""
    from pipelines.stages.prm_eval import PRMEvalConfig
    from pipelines.stages.prm_eval import run as prm_eval

    f1: dict[tuple[str, str], float] = {}
    for task in dict.fromkeys(r.task for r in runs):
        first = next(r for r in runs if r.task == task)
        table = str(first.folder(out) / "round-0001" / "generate")
        for r in runs:
            if (r.task == task and r.setting != "-" and r.seed == first.seed
                    and (task, r.setting) not in f1):
                f1[(task, r.setting)] = prm_eval(PRMEvalConfig(benchmarks=[table],
                                                               prm=r.prm)).average_f1
    return f1


def markdown(cfg: Any, final: pl.DataFrame, comp: pl.DataFrame, metrics: pl.DataFrame,
             prm_f1: dict[tuple[str, str], float], timings: list[dict[str, Any]],
             seconds: float, plots: list[str]) -> str:
    """The study's report (the numbers; docs/study.md adds the reading)."""
    import os
    import platform

    out = Path(cfg.out)
    lines = ["# scope study", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; wall time "
             f"{seconds / 60:.1f} min for {len(timings)} runs on {cfg.workers} worker(s) "
             f"(load average at the end: {os.getloadavg()[0]:.1f}). Seeds {cfg.seeds}; "
             f"algorithms {', '.join(cfg.algos)}; bootstrap resamples {cfg.resamples}.", ""]
    if prm_f1:
        lines += ["## PRM settings: first-error F1 on the initial policy's rollouts", "",
                  "| task | setting | F1 (%, ProcessBench protocol) |", "|---|---|---|"]
        lines += [f"| {t} | {s} | {v:.1f} |" for (t, s), v in prm_f1.items()]
        lines.append("")
    cols = [c for c in METRICS if c in final.columns]
    costs = [c for c in COSTS if c in final.columns]
    for (task, eval_set), sub in final.group_by("task", "eval_set", maintain_order=True):
        lines += [f"## {task}, `{eval_set}`: last round (mean ± std over seeds)", "",
                  "| config | seeds | " + " | ".join(cols + costs) + " |",
                  "|" + "---|" * (len(cols) + len(costs) + 2)]
        for row in sub.iter_rows(named=True):
            lines.append(f"| {row['config']} | {row['seeds']} | "
                         + " | ".join(fmt(row[c], row[f"{c}_std"]) for c in cols) + " | "
                         + " | ".join(fmt(row[c], digits=0) for c in costs) + " |")
        lines.append("")
    if comp.height:
        lines += [f"## Paired differences, {cfg.target} - baseline (95% bootstrap CI)", "",
                  "`*`: the interval excludes zero.", "",
                  "| task | eval set | PRM setting | baseline | metric | diff | 95% CI |",
                  "|---|---|---|---|---|---|---|"]
        for r in comp.iter_rows(named=True):
            star = " *" if r["excludes_zero"] else ""
            lines.append(f"| {r['task']} | {r['eval_set']} | {r['setting']} | {r['baseline']} "
                         f"| {r['metric']} | {r['mean_diff']:+.3f}{star} | "
                         f"[{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}] |")
        lines.append("")
    probes = [c for c in PROBES if c in metrics.columns]
    if probes:
        trained = pl.concat([round_rows(t) for _, t in metrics.group_by("task",
                                                                         maintain_order=True)])
        per_round = (trained.filter(pl.col("round") > 0)
                     .group_by("task", "config", "round", maintain_order=True)
                     .agg(pl.col(c).mean() for c in probes).sort("task", "config", "round"))
        lines += ["## What training saw, per round (mean over seeds)", "",
                  "| task | config | round | " + " | ".join(probes) + " |",
                  "|" + "---|" * (len(probes) + 3)]
        for row in per_round.iter_rows(named=True):
            lines.append(f"| {row['task']} | {row['config']} | {row['round']} | "
                         + " | ".join(fmt(row[c]) for c in probes) + " |")
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{Path(p).stem}]({Path(p).relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(df: pl.DataFrame, out: Path, settings: list[str]) -> list[str]:
    """Per eval set: the report's per-round plots of every config (exact and baselines), and
    the target's accuracy and path diversity against PRM setting."""
    written = []
    for eval_set in eval_sets(df):
        folder = out / eval_set
        folder.mkdir(parents=True, exist_ok=True)
        keep = df.filter(~pl.col("config").str.contains(r"\.") |
                         pl.col("config").str.ends_with(".exact"))
        written += [p for p in make_plots(keep, folder, eval_set, label="config")
                    if Path(p).name in ("accuracy.png", "pass_at_k.png", "diversity.png")]
        if settings:
            written.append(_setting_plot(df, folder / "prm_settings.png", eval_set, settings))
    return written


def _setting_plot(df: pl.DataFrame, path: Path, eval_set: str, settings: list[str]) -> str:
    """Last-round accuracy (and path entropy where measured) of the PRM algorithms per PRM
    setting, PRM-free baselines as horizontal lines; error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = df.filter((pl.col("eval_set") == eval_set)
                     & (pl.col("round") == pl.col("round").max().over("run")))
    metrics = [m for m in ("accuracy", "path_entropy") if m in last.columns
               and last[m].drop_nulls().len()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        agg = last.group_by("config").agg(pl.col(metric).mean().alias("m"),
                                          pl.col(metric).std().alias("s"))
        values = {r["config"]: (_num(r["m"]), _num(r["s"], 0.0))
                  for r in agg.iter_rows(named=True)}
        xs = list(range(len(settings)))
        for algo in sorted({c.split(".")[0] for c in values if "." in c}):
            pts = [values.get(f"{algo}.{s}", (float("nan"), 0.0)) for s in settings]
            ax.errorbar(xs, [p[0] for p in pts], yerr=[p[1] for p in pts], marker="o",
                        capsize=3, label=algo)
        for c, (m, _) in values.items():
            if "." not in c:
                ax.axhline(m, linestyle="--", alpha=0.6, label=c,
                           color="grey" if c == "grpo" else "tab:brown")
        ax.set_xticks(xs, settings)
        ax.set_title(f"{metric} after the last round ({eval_set})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _num(x: Any, missing: float = float("nan")) -> float:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def print_summary(comp: pl.DataFrame, final: pl.DataFrame, out: Path, seconds: float) -> None:
    """One screen: accuracy of every config on each eval set, and the accuracy CIs."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for (task, eval_set), sub in final.group_by("task", "eval_set", maintain_order=True):
        t = Table(title=f"{task} / {eval_set}: last round, mean ± std over seeds",
                  title_justify="left")
        for c in ("config", "acc", "pass@n", "paths H"):
            t.add_column(c, justify="left" if c == "config" else "right")
        for r in sub.iter_rows(named=True):
            t.add_row(r["config"], fmt(r["accuracy"], r["accuracy_std"]),
                      fmt(r["pass@max"], r["pass@max_std"]),
                      fmt(r.get("path_entropy"), r.get("path_entropy_std")))
        console.print(t)
    if comp.height:
        acc = comp.filter(pl.col("metric") == "accuracy")
        t = Table(title="accuracy: target - baseline (same PRM setting), paired bootstrap 95% "
                  "CI; * excludes 0", title_justify="left")
        for c in ("task", "set", "PRM", "baseline", "diff", "CI"):
            t.add_column(c)
        for r in acc.iter_rows(named=True):
            t.add_row(r["task"], r["eval_set"], r["setting"], r["baseline"].split(".")[0],
                      f"{r['mean_diff']:+.3f}{' *' if r['excludes_zero'] else ''}",
                      f"[{r['ci_lo']:+.3f},{r['ci_hi']:+.3f}]")
        console.print(t)
    console.print(f"study: {out}/study.md ({seconds / 60:.1f} min)", highlight=False)
