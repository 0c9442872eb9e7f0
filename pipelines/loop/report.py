"""`scope report RUN_DIR...`: plots and a markdown summary of one or more runs.

Reads each run's `metrics.parquet` (one row per round and eval set, written by `scope run`).
Runs with the same label (algo by default) are seeds of one configuration: plots show their
mean with a band spanning min..max, tables show mean +- sample std (and n). Plots (PNG,
matplotlib Agg): held-out accuracy, pass@k (k = n), diversity (1 - self-BLEU, novel equations),
salvage rate and training loss per round, the pass@k curve of the final round, and the
first-error position histogram of the training rollouts (all rounds pooled, normalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.loop.round_loop import METRICS_FILE
from scope_data.algos import ALGO_NAMES
from scope_data.correction import SALVAGE_RATE

TABLE_COLUMNS = ("accuracy", "pass@1", "pass@max", "self_bleu_div", "novel_equations",
                 "distinct_4", "salvage_rate")
# what each algorithm spent, summed over a run's rounds (equal budgets are a fair comparison)
BUDGET_COLUMNS = ("train_steps", "tokens_trained", "rollouts", "generated_tokens",
                  "teacher_tokens", "prm_tokens")


@dataclass
class ReportResult:
    out: str
    plots: list[str]
    markdown: str
    final: pl.DataFrame  # one row per label: mean/std of the final round


def load_runs(run_dirs: list[str]) -> pl.DataFrame:
    """All runs' metrics stacked, with a `run` column (the folder) and `pass@max` (k = n)."""
    frames = []
    for d in run_dirs:
        path = Path(d) / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {METRICS_FILE} (not a `scope run` folder, or no "
                                    "round finished yet)")
        df = pl.read_parquet(path).with_columns(pl.lit(str(d)).alias("run"))
        n = int(df["n"].max())
        frames.append(df.with_columns(pl.col(f"pass@{n}").alias("pass@max")))
    return pl.concat(frames, how="diagonal_relaxed")


def round_rows(df: pl.DataFrame) -> pl.DataFrame:
    """One row per (run, round), for the training figures every row of a round repeats
    (rounds without evaluation have one row, with a null eval_set)."""
    return df.unique(subset=["run", "round"], keep="first", maintain_order=True)


def eval_sets(df: pl.DataFrame) -> list[str]:
    """The eval sets of stacked metrics, in order."""
    return df["eval_set"].drop_nulls().unique(maintain_order=True).to_list()


def _label_order(labels: list[str]) -> list[str]:
    return sorted(set(labels), key=lambda x: (ALGO_NAMES.index(x) if x in ALGO_NAMES else 99, x))


def final_table(df: pl.DataFrame, eval_set: str | None = None, label: str = "algo"
                ) -> pl.DataFrame:
    """Mean and std over runs (seeds) of each label's last round, on one eval set."""
    eval_set = eval_set or eval_sets(df)[0]
    sub = df.filter(pl.col("eval_set") == eval_set)
    last = sub.filter(pl.col("round") == pl.col("round").max().over("run"))
    cols = [c for c in TABLE_COLUMNS if c in last.columns]
    aggs: list[Any] = [pl.len().alias("runs"), pl.col("round").max().alias("rounds")]
    for c in cols:
        aggs += [pl.col(c).mean().alias(c), pl.col(c).std().alias(f"{c}_std")]
    table = last.group_by(label).agg(aggs)
    order = _label_order(table[label].to_list())
    return table.with_columns(pl.col(label).cast(pl.Enum(order))).sort(label).with_columns(
        pl.col(label).cast(pl.String))


def budget_table(df: pl.DataFrame, label: str = "algo") -> str:
    """Markdown: per label, the mean over runs of each budget column summed over rounds."""
    cols = [c for c in BUDGET_COLUMNS if c in df.columns]
    if not cols:
        return ""
    per_run = round_rows(df).group_by(label, "run").agg(pl.col(c).fill_null(0).sum()
                                                        for c in cols)
    table = per_run.group_by(label).agg(pl.col(c).mean() for c in cols)
    order = _label_order(table[label].to_list())
    lines = [f"| {label} | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in sorted(table.iter_rows(named=True), key=lambda r: order.index(r[label])):
        lines.append(f"| {row[label]} | " + " | ".join(f"{row[c]:,.0f}" for c in cols) + " |")
    return "\n".join(lines)


def initial_row(df: pl.DataFrame, eval_set: str) -> dict[str, Any] | None:
    """Mean over runs of round 0 (the initial policy) on `eval_set`."""
    sub = df.filter((pl.col("eval_set") == eval_set) & (pl.col("round") == 0))
    if sub.height == 0:
        return None
    return {c: sub[c].mean() for c in TABLE_COLUMNS if c in sub.columns and c != "salvage_rate"}


def fmt(mean: Any, std: Any = None, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` decimals; "-" for a missing mean, no std when missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(final: pl.DataFrame, initial: dict[str, Any] | None, label: str = "algo"
                   ) -> str:
    cols = [c for c in TABLE_COLUMNS if c in final.columns]
    head = f"| {label} | runs | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    if initial is not None:
        lines.append("| initial policy | - | " + " | ".join(fmt(initial.get(c)) for c in cols)
                     + " |")
    for row in final.iter_rows(named=True):
        cells = [fmt(row[c], row.get(f"{c}_std") if row["runs"] > 1 else None) for c in cols]
        lines.append(f"| {row[label]} | {row['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _band(ax: Any, df: pl.DataFrame, col: str, label: str, key: str) -> None:
    """Mean over runs per round, with a min..max band."""
    sub = df.filter(pl.col(col).is_not_null())
    if sub.height == 0:
        return
    agg = sub.group_by("round").agg(pl.col(col).mean().alias("m"), pl.col(col).min().alias("lo"),
                                    pl.col(col).max().alias("hi")).sort("round")
    line = ax.plot(agg["round"], agg["m"], marker="o", label=label)[0]
    if sub["run"].n_unique() > 1:
        ax.fill_between(agg["round"], agg["lo"], agg["hi"], alpha=0.15, color=line.get_color())


def make_plots(df: pl.DataFrame, out: Path, eval_set: str, label: str = "algo") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    ev = df.filter(pl.col("eval_set") == eval_set)
    labels = _label_order(ev[label].to_list())
    n = int(ev["n"].max())
    per_round = [
        ("accuracy.png", ["accuracy"], f"held-out accuracy ({eval_set})"),
        ("pass_at_k.png", ["pass@max"], f"held-out pass@{n} ({eval_set})"),
        ("diversity.png", ["self_bleu_div", "novel_equations"],
         "held-out diversity: 1 - self-BLEU (solid), novel equations (dashed)"),
        ("salvage_rate.png", ["salvage_rate"], f"salvage rate ({SALVAGE_RATE})"),
        ("train_loss.png", ["train_loss"], "training loss (mean per round)"),
    ]
    trained = round_rows(df)  # training figures: every round, evaluated or not
    for name, cols, title in per_round:
        src = trained if name in ("salvage_rate.png", "train_loss.png") else ev
        if not any(c in src.columns and src[c].drop_nulls().len() for c in cols):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in labels:
            for j, c in enumerate(cols):
                if c not in ev.columns:
                    continue
                before = len(ax.lines)
                _band(ax, src.filter(pl.col(label) == lab), c, lab if j == 0 else "_", label)
                if j and len(ax.lines) > before:
                    ax.lines[-1].set_linestyle("--")
                    ax.lines[-1].set_color(ax.lines[-1 - j].get_color())
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(str(out / name))
    # pass@k curve of the final round
    fig, ax = plt.subplots(figsize=(6, 4))
    last = ev.filter(pl.col("round") == pl.col("round").max().over("run"))
    ks = [k for k in range(1, n + 1) if f"pass@{k}" in last.columns]
    for lab in labels:
        sub = last.filter(pl.col(label) == lab)
        ax.plot(ks, [sub[f"pass@{k}"].mean() for k in ks], marker="o", label=lab)
    ax.set_xlabel("k")
    ax.set_title(f"pass@k after the last round ({eval_set})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k_curve.png", dpi=110)
    plt.close(fig)
    written.append(str(out / "pass_at_k_curve.png"))
    # first-error histogram of training rollouts, pooled over rounds
    if "first_error_hist" in ev.columns:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / max(1, len(labels))
        for i, lab in enumerate(labels):
            hists = ev.filter((pl.col(label) == lab) & (pl.col("round") > 0))
            hists = hists.unique(["run", "round"])["first_error_hist"].drop_nulls().to_list()
            size = max((len(h) for h in hists), default=0)
            total = [sum(h[k] for h in hists if k < len(h)) for k in range(size)]
            if not sum(total):
                continue
            ax.bar([k + i * width for k in range(size)], [t / sum(total) for t in total],
                   width=width, label=lab)
        ax.set_xlabel("first wrong step (index) of failed training rollouts")
        ax.set_ylabel("share")
        ax.set_title("first-error position (all rounds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "first_error_hist.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "first_error_hist.png"))
    return written


def report(run_dirs: list[str], out: str | None = None, label: str = "algo",
           title: str = "scope report", notes: str = "") -> ReportResult:
    """Write the plots and `report.md` for `run_dirs` into `out` (default: the first run)."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    df = load_runs(run_dirs)
    out_dir = Path(out or run_dirs[0]) / ("" if out else "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = eval_sets(df)
    plots: list[str] = []
    sections = [f"# {title}\n"]
    if notes:
        sections.append(notes + "\n")
    for eval_set in sets:
        sub_dir = out_dir if len(sets) == 1 else out_dir / eval_set
        sub_dir.mkdir(parents=True, exist_ok=True)
        plots += make_plots(df, sub_dir, eval_set, label)
        final = final_table(df, eval_set, label)
        sections.append(f"## Final round on `{eval_set}` (mean ± std over runs)\n")
        sections.append(markdown_table(final, initial_row(df, eval_set), label) + "\n")
    budget = budget_table(df, label)
    if budget:
        sections.append("## Budget (per run, summed over rounds; mean over runs)\n")
        sections.append(budget + "\n")
    sections.append("## Runs\n")
    sections += [f"- `{d}`" for d in run_dirs]
    sections.append("\n## Plots\n")
    sections += [f"![{Path(p).stem}]({Path(p).relative_to(out_dir)})" for p in plots]
    text = "\n".join(sections) + "\n"
    (out_dir / "report.md").write_text(text)
    df.drop("first_error_hist", strict=False).write_csv(out_dir / "metrics.csv")
    return ReportResult(str(out_dir), plots, text, final_table(df, sets[0], label))
