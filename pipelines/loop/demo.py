"""`scope demo`: SCOPE against its baselines on the embedded arith task, on CPU.

Runs the `arith-tiny` recipe once per (algo, seed) with everything else equal: the same
warm-started tiny policy, training problems, rounds, samples per problem, optimizer options
and seeds (rule PRM, oracle teacher). Held-out problems come from another seed and exclude
every training prompt; nothing is tuned on them. Then writes the report (plots + report.md)
and prints the final table (mean ± std over seeds) and the paired differences of `scope`
against each baseline (same seed, same held-out draws).

Every run lives in `OUT/runs/<algo>-s<seed>/` and resumes: rerunning the demo reuses finished
stages. Round 0 (the initial policy's evaluation) is identical for every algo of a seed, so it
is computed once and copied into the other runs of that seed (their stage hashes match).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import option
from pipelines.loop.recipe import load_recipe
from scope_data.algos import ALGO_NAMES

QUICK_ROUNDS = 2


@dataclass
class DemoConfig:
    """Options of `scope demo`."""

    out: str = option("scope-demo", help="output folder (runs/, report.md, plots)")
    quick: bool = option(False, help="one seed, 2 rounds (about 2 minutes)")
    seeds: int = option(3, help="seeds per algorithm (ignored with --quick)")
    rounds: int | None = option(None, help="rounds (default: the recipe's; 2 with --quick)")
    algos: tuple[str, ...] = option(ALGO_NAMES, sep=",",
                                    help="comma-separated algorithms to compare")
    recipe: str = option("arith-tiny", help="recipe file or bundled name")
    overrides: dict[str, Any] = option(default_factory=dict, cli=False,
                                       help="recipe keys to override")
    verbose: bool = option(False, help="print every stage's summary")
    online: bool = option(False, help="run each (algo, seed) as warm worker processes "
                          "(`scope run --online`; K = 0 prints the same table)")
    max_staleness: int = option(0, help="online: generate with the policy of round r-1-K")
    online_workers: dict[str, int] = option(
        default_factory=dict, help="online: worker processes of a role as JSON (`scope run "
        "--online-workers`); roles an algorithm does not run are ignored")
    only_seeds: tuple[int, ...] | None = option(
        None, cli=False, help="run just these seeds (parallel workers), no report")


@dataclass
class DemoResult:
    out: str
    run_dirs: list[str]
    final: pl.DataFrame
    paired: pl.DataFrame
    report_md: str
    seconds: float


def run(cfg: DemoConfig) -> DemoResult:
    """Run every (algo, seed), write the report, print the comparison."""
    from pipelines.console import console
    from pipelines.loop import round_loop as run_loop
    from pipelines.loop.report import load_runs, report
    from pipelines.loop.round_inputs import share_round0

    t0, cpu0 = time.time(), time.process_time()
    import os

    import torch

    # one thread: the tiny model's ops are too small to gain from more, and on a shared machine
    # oversubscribed OpenMP threads cost 3x wall time (measured: generate 54 s vs 138 s)
    torch.set_num_threads(int(os.environ.get("SCOPE_NUM_THREADS", "1")))
    for algo in cfg.algos:
        if algo not in ALGO_NAMES:
            raise ValueError(f"unknown algo {algo!r}; valid: {', '.join(ALGO_NAMES)}")
    seeds = 1 if cfg.quick else cfg.seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    rounds = cfg.rounds or (QUICK_ROUNDS if cfg.quick else None)
    out = Path(cfg.out)
    base = load_recipe(cfg.recipe, cfg.overrides)
    rounds = rounds or base.rounds
    console.print(f"[bold]scope demo[/]: algos {', '.join(cfg.algos)}; {seeds} seed(s); "
                  f"{rounds} rounds; recipe {base.source}", highlight=False)
    _tiny(base)
    run_dirs: list[str] = []
    for seed in cfg.only_seeds if cfg.only_seeds is not None else range(seeds):
        first: Path | None = None
        for algo in cfg.algos:
            name = f"{algo}-s{seed}"
            recipe = load_recipe(cfg.recipe, {**cfg.overrides, "algo": algo, "seed": seed,
                                              "name": name})
            run_dir = out / "runs" / name
            if first is not None:
                share_round0(first, run_dir)
            t = time.time()
            console.print(f"[bold magenta]== {name}[/]", highlight=False)
            run_loop.run(run_loop.RunConfig(recipe=recipe, out=str(run_dir), rounds=rounds,
                                            resume=True, verbose=cfg.verbose,
                                            online=cfg.online,
                                            max_staleness=cfg.max_staleness,
                                            online_workers=cfg.online_workers))
            console.print(f"[magenta]{name} done in {time.time() - t:.0f} s[/]", highlight=False)
            first = first or run_dir
            run_dirs.append(str(run_dir))
    if cfg.only_seeds is not None:
        return DemoResult(str(out), run_dirs, pl.DataFrame(), pl.DataFrame(), "",
                          time.time() - t0)
    df = load_runs(run_dirs)
    paired = paired_differences(df)
    seconds = time.time() - t0
    cpu = time.process_time() - cpu0
    notes = demo_notes(base, seeds, rounds, paired, seconds, cpu)
    result = report(run_dirs, str(out), title="scope demo: arith-tiny", notes=notes)
    print_final(result.final, paired, seconds)
    console.print(f"report: {result.out}/report.md", highlight=False)
    return DemoResult(str(out), run_dirs, result.final, paired, result.markdown, seconds)


def _tiny(recipe: Any) -> None:
    """Build (or reuse) the tiny policy up front, so its one-off cost is visible."""
    from pipelines.console import console
    from pipelines.loop.round_inputs import initial_policy

    t = time.time()
    path = initial_policy(recipe)
    console.print(f"policy {path} ready in {time.time() - t:.0f} s", highlight=False)


def paired_differences(df: pl.DataFrame, target: str = "scope",
                       metrics: tuple[str, ...] = ("accuracy", "pass@max", "self_bleu_div",
                                                   "novel_equations")) -> pl.DataFrame:
    """target - baseline per seed on the final round of the first eval set; mean, std, wins."""
    eval_set = df["eval_set"][0]
    last = df.filter((pl.col("eval_set") == eval_set)
                     & (pl.col("round") == pl.col("round").max().over("run")))
    if target not in last["algo"].to_list():
        return pl.DataFrame()
    mine = last.filter(pl.col("algo") == target).select("seed", *metrics)
    rows = []
    for base in [a for a in ALGO_NAMES if a != target and a in last["algo"].to_list()]:
        other = last.filter(pl.col("algo") == base).select("seed", *metrics)
        joined = mine.join(other, on="seed", suffix="_b")
        for m in metrics:
            diff = joined[m] - joined[f"{m}_b"]
            rows.append({"baseline": base, "metric": m, "seeds": joined.height,
                         "mean_diff": diff.mean(), "std_diff": diff.std(),
                         "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum())})
    return pl.DataFrame(rows)


def demo_notes(recipe: Any, seeds: int, rounds: int, paired: pl.DataFrame, seconds: float,
               cpu: float) -> str:
    import os
    import platform

    p = recipe.problems.get("arith", {})
    e = recipe.eval[0].get("arith", {})
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"{platform.system()}; wall time {seconds / 60:.1f} min, CPU time of the demo process "
        f"{cpu / 60:.1f} min (load average at the end: {os.getloadavg()[0]:.1f}).",
        f"Setup: policy `{recipe.policy}` (warm-started tiny Qwen2), PRM `{recipe.prm}`, teacher "
        f"`{recipe.teacher}`; {rounds} rounds; {p.get('count')} training problems x "
        f"{recipe.generate.get('n')} samples per round; held-out {e.get('count')} problems "
        f"(seed {e.get('seed')}, no training prompt) x {recipe.evaluate.get('n')} samples at "
        f"T={recipe.evaluate.get('temperature')}; {seeds} seed(s).",
    ]
    if paired.height:
        lines += ["", "Paired differences, scope - baseline (final round, same seed):", "",
                  "| baseline | metric | seeds | mean diff | std | scope wins |",
                  "|---|---|---|---|---|---|"]
        for r in paired.iter_rows(named=True):
            std = "-" if r["std_diff"] is None else f"{r['std_diff']:.3f}"
            mean = "-" if r["mean_diff"] is None else f"{r['mean_diff']:+.3f}"
            lines.append(f"| {r['baseline']} | {r['metric']} | {r['seeds']} | {mean} | {std} | "
                         f"{r['wins']}/{r['seeds']} |")
    return "\n".join(lines)


def print_final(final: pl.DataFrame, paired: pl.DataFrame, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    def cell(row: dict[str, Any], c: str) -> str:
        m, s = row.get(c), row.get(f"{c}_std")
        if m is None:
            return "-"
        return f"{m:.3f}" + (f" ± {s:.3f}" if s is not None and row["runs"] > 1 else "")

    # pass@1 equals accuracy (mean over samples); report.md has every column
    cols = [c for c in ("accuracy", "pass@max", "self_bleu_div", "novel_equations",
                        "distinct_4", "salvage_rate") if c in final.columns]
    table = Table(title=f"scope demo: held-out, final round (mean ± std over seeds); "
                  f"{seconds / 60:.1f} min", title_justify="left")
    short = {"accuracy": "acc", "pass@max": "pass@n", "self_bleu_div": "1-sBLEU",
             "novel_equations": "novel eq", "distinct_4": "dist-4", "salvage_rate": "salvage"}
    for c in ("algo", "runs", *cols):
        table.add_column(short.get(c, c), justify="left" if c == "algo" else "right")
    for row in final.iter_rows(named=True):
        table.add_row(row["algo"], str(row["runs"]), *[cell(row, c) for c in cols])
    out = Console()
    out.print(table)
    if paired.height:
        pt = Table(title="scope - baseline, paired by seed", title_justify="left")
        for c in ("baseline", "metric", "mean diff", "std", "scope wins"):
            pt.add_column(c)
        for r in paired.iter_rows(named=True):
            pt.add_row(r["baseline"], r["metric"],
                       "-" if r["mean_diff"] is None else f"{r['mean_diff']:+.3f}",
                       "-" if r["std_diff"] is None else f"{r['std_diff']:.3f}",
                       f"{r['wins']}/{r['seeds']}")
        out.print(pt)
