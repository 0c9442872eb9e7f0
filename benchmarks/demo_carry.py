"""The demo with carried trainer state (the default) against fresh state every round.

Runs `scope demo --quick`'s setup (arith-tiny, 2 rounds, every algo) for each seed twice: with
`train: {carry_state: true}` (optimizer moments, schedule and RNG continue across rounds) and
`carry_state: false` (a fresh optimizer each round, the behaviour before carried state), then
prints both final held-out tables and the per-algo mean ± sd over seeds of each, and the paired
difference carried - fresh. Runs resume (OUT/<variant>/runs/...), so a rerun reuses them.

    python benchmarks/demo_carry.py [--seeds 1,2,3] [--rounds 2] [--out demo-carry]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated demo seeds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="demo-carry")
    ap.add_argument("--recipe", default="arith-tiny")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import polars as pl

    from pipelines.loop.demo import DemoConfig
    from pipelines.loop.demo import run as demo
    from pipelines.loop.recipe import load_recipe
    from pipelines.loop.report import final_table, load_runs

    seeds = tuple(int(s) for s in args.seeds.split(","))
    base = load_recipe(args.recipe)
    finals, lasts = {}, []
    for variant, carry in (("carried", True), ("fresh", False)):
        t = time.time()
        res = demo(DemoConfig(out=str(Path(args.out) / variant), rounds=args.rounds,
                              recipe=args.recipe, only_seeds=seeds,
                              overrides={"train": {**base.train, "carry_state": carry}}))
        df = load_runs(res.run_dirs)
        finals[variant] = final_table(df)
        eval_set = df["eval_set"][0]
        lasts.append(df.filter((pl.col("eval_set") == eval_set)
                               & (pl.col("round") == pl.col("round").max().over("run")))
                     .select("algo", "seed", "accuracy").with_columns(variant=pl.lit(variant)))
        print(f"{variant}: {len(res.run_dirs)} runs in {time.time() - t:.0f} s")
    cols = ["algo", "runs", "accuracy", "accuracy_std", "pass@max", "train_steps"]
    with pl.Config(tbl_rows=50, tbl_cols=20, float_precision=3):
        for variant, final in finals.items():
            print(f"\n{variant} state, final round (mean and sd over seeds {args.seeds}):")
            print(final.select([c for c in cols if c in final.columns]))
        acc = pl.concat(lasts).pivot("variant", index=["algo", "seed"], values="accuracy")
        diff = acc.with_columns(diff=pl.col("carried") - pl.col("fresh")).group_by(
            "algo", maintain_order=True).agg(
            pl.col("carried").mean().alias("carried"), pl.col("fresh").mean().alias("fresh"),
            pl.col("diff").mean().alias("carried-fresh"), pl.col("diff").std().alias("sd"),
            (pl.col("diff") > 0).sum().alias("carried wins"), pl.len().alias("seeds"))
        print("\nheld-out accuracy, paired by seed:")
        print(diff)
    print(f"(load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
