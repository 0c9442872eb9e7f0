"""DAPO dynamic sampling in `scope run` (recipe key `dynamic_sampling`; rule and selection in
`scope_data.dynamic_sampling`).

A round with dynamic sampling draws sampling batches of `generate.prompts_per_round` problems:
batch k of round r is batch `first + k - 1` of the seeded epoch order (`--prompt-batch`),
where `first` continues after the batches earlier rounds drew. Layout of round r::

    round-XXXX/generate/, score/, correct/             sampling batch 1 (as without it)
    round-XXXX/batch-02/generate/, score/, correct/    batch 2, ... (only when drawn)
    round-XXXX/select/                                 the trained groups: a normal table of
                                                       the kind the algo trains from
    round-XXXX/train/                                  trained on select/

Each batch's stages are normal stages with markers (`generate-b02`, ...), each writing a
normal table with a manifest; after each batch the loop judges its groups (the trainer's
assembly, with the round's train options) and draws the next one until `target` groups are
selected or `max_num_gen_batches` are drawn. `select/`'s config names the chosen (batch,
problem) pairs and its manifest stats hold `scope_data.dynamic_sampling.sampling_stats`, so
a resumed run (every decision re-derived from the finished tables) reruns nothing that is done.
`--dry-run` can only plan batch 1 (later batches depend on its rollouts) and has no command
for the selection.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import identity, option
from pipelines.loop import round_stages as stages
from pipelines.loop.recipe import Recipe
from scope_data.algos import get_algo
from scope_data.dynamic_sampling import filter_groups, sampling_done, sampling_stats
from scope_data.hashing import derive_seed

SELECT_DIR = "select"


@dataclass
class SelectConfig:
    """The groups a dynamic-sampling round trains on (the loop's own stage, no CLI)."""

    out: str = option(help="output table folder", identity=False)
    tables: list[str] = option(help="the sampling batches' training tables, batch 1 first")
    groups: list[list[Any]] = option(help="selected [batch, problem_id] pairs, in order")
    stats: dict[str, Any] = option(help="sampling counts (sampling_stats)")


def batches_drawn(rd: Path) -> int:
    """Sampling batches a finished round drew (1 without dynamic sampling, or unknown)."""
    path = rd / "_stages" / f"{SELECT_DIR}.json"
    if not path.is_file():
        return 1
    return int(json.loads(path.read_text())["config"]["stats"]["sampling_batches"])


def first_batch(run_dir: Path, r: int) -> int:
    """Round r's first batch of the epoch order: after every batch earlier rounds drew."""
    return 1 + sum(batches_drawn(run_dir / f"round-{q:04d}") for q in range(1, r))


def judge(tcfg: Any, table: str, k: int) -> pl.DataFrame:
    """Groups of one batch's training table (columns of `filter_groups` plus rollouts and
    generated tokens of its policy rows), judged by the trainer's own assembly."""
    from pipelines.training.inputs import assemble_frame
    from scope_data.shards import read_arrow, read_manifest

    df = pl.from_arrow(read_arrow(table))
    kind = read_manifest(table).table
    nonzero = assemble_frame(tcfg, df, kind).rows["problem_id"].unique()
    policy = df.filter(pl.col("kind") == "policy") if "kind" in df.columns else df
    return (policy.group_by("problem_id", maintain_order=True)
            .agg(rollouts=pl.len(),
                 tokens=pl.col("response_token_ids").list.len().sum().cast(pl.Int64))
            .select(pl.lit(k, pl.Int32).alias("batch"), "problem_id",
                    nonzero=pl.col("problem_id").is_in(nonzero.implode()), rollouts="rollouts",
                    tokens="tokens"))


def write_select(cfg: SelectConfig) -> None:
    """Rows of the selected groups from the batch tables, as one table of their kind."""
    from scope_data.shards import TableStore, read_arrow, read_manifest

    picked = pl.DataFrame(cfg.groups, schema={"batch": pl.Int32, "problem_id": pl.String},
                          orient="row")
    parts, inputs = [], []
    for k, table in enumerate(cfg.tables, start=1):
        inputs.append(read_manifest(table))
        ids = picked.filter(pl.col("batch") == k)["problem_id"]
        parts.append(pl.from_arrow(read_arrow(table)).filter(pl.col("problem_id").is_in(
            ids.implode())))
    head = inputs[0]
    config = {**head.config, "stage": "select", "select": identity(cfg)}
    TableStore(cfg.out, head.table).write(pl.concat(parts).to_arrow(), config, inputs,
                                          stats=cfg.stats)


def dynamic_round(runner: Any, recipe: Recipe, run_dir: Path, r: int, policy: str,
                  policy_hash: str, train_problems: str, problem_hashes: dict[str, str]
                  ) -> tuple[str, str]:
    """Sampling batches and selection of round r -> (table to train on, its stage hash)."""
    ds = recipe.dynamic_sampling
    where, rd = f"round-{r:04d}", run_dir / f"round-{r:04d}"
    target = int(recipe.generate["prompts_per_round"])
    first = r if runner.dry_run else first_batch(run_dir, r)  # dry run: one batch a round
    tcfg = stages.train_config(recipe, "", policy, str(rd / "train"), r)
    algo = get_algo(recipe.algo)
    tables, hashes, frames = [], [], []
    for k in range(1, ds["max_num_gen_batches"] + 1):
        folder, tag = stages.batch_folder(rd, k), "" if k == 1 else f"-b{k:02d}"
        gcfg = stages.generate_config(recipe, train_problems, policy, str(folder / "generate"),
                                      r)
        gcfg = dataclasses.replace(gcfg, prompt_batch=first + k - 1,
                                   seed=gcfg.seed if k == 1 else derive_seed(gcfg.seed, "batch", k))
        h = runner.stage(where, f"generate{tag}", gcfg, [problem_hashes["train"], policy_hash],
                         stages.run_generate)
        table = gcfg.out
        if algo.uses_prm:
            scfg = stages.score_config(recipe, table, str(folder / "score"))
            h = runner.stage(where, f"score{tag}", scfg, [h], stages.run_score)
            table = scfg.out
        if algo.uses_corrections:
            ccfg = stages.correct_config(recipe, table, str(folder / "correct"), r)
            h = runner.stage(where, f"correct{tag}", ccfg, [h], stages.run_correct)
            table = ccfg.out
        tables.append(table)
        hashes.append(h)
        if runner.dry_run:
            break
        frames.append(judge(tcfg, table, k))
        if sampling_done(pl.concat(frames), target, ds["max_num_gen_batches"]):
            break
    groups = pl.concat(frames) if frames else pl.DataFrame(
        schema={"batch": pl.Int32, "problem_id": pl.String, "nonzero": pl.Boolean})
    chosen = filter_groups(groups, target).filter("selected")
    if chosen.height == 0:  # no gradient anywhere: batch 1 as drawn, train records the skip
        chosen = groups.filter(pl.col("batch") == 1)
    sel = SelectConfig(out=str(rd / SELECT_DIR), tables=tables,
                       groups=[list(t) for t in chosen.select("batch", "problem_id").iter_rows()],
                       stats={**sampling_stats(groups, target), "sampling_batches": len(tables)}
                       if frames else {})
    h = runner.stage(where, SELECT_DIR, sel, hashes, write_select, plan=False)
    return sel.out, h
