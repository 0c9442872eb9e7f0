"""What `scope train` reads: the input table checked against the algorithm and the sampling
that produced it, then assembled into training rows (`scope_data.assembly`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from scope_data.algos import UNSCORED_STATUSES, training_input_error

if TYPE_CHECKING:
    from pipelines.training.train import TrainConfig


def load_rows(cfg: TrainConfig) -> tuple[Any, Any]:
    """Read the input table and assemble its groups -> (Assembly, input Manifest).

    The algo's registry record (`scope_data.algos`) says which tables it trains from (a
    `rollouts` or `scored` table's rows are all policy rows), which correction mode a corrected
    table must have been made with (its manifest config's `mode`) and whether every response
    needs PRM scores. A mismatch, an empty table, or a table whose every group has zero
    advantage raises ValueError.
    """
    from scope_data.shards import read_arrow, read_manifest
    from scope_data.validate import check_table

    manifest = read_manifest(cfg.data, cfg.storage_options)
    check_table(manifest, cfg.storage_options)
    kind = manifest.table
    df = pl.from_arrow(read_arrow(cfg.data, cfg.storage_options))
    unscored = (df.filter(pl.col("score_status").is_in(UNSCORED_STATUSES)).height
                if "score_status" in df.columns else 0)
    error = training_input_error(cfg.algo, kind, manifest.config.get("mode"), unscored)
    if error:
        raise ValueError(f"{cfg.data}: {error}")
    if df.height == 0:
        raise ValueError(f"{cfg.data}: the {kind} table is empty; nothing to train")
    if cfg.old_logprobs == "behaviour":
        check_sampling(df, cfg.temperature, cfg.data)
    df = df.with_columns(pl.col("top_k").fill_null(0), pl.col("top_p").fill_null(1.0)) if (
        "top_k" in df.columns) else df.with_columns(top_k=pl.lit(0, pl.Int32))
    assembly = assemble_frame(cfg, df, kind)
    if assembly.rows.height == 0:
        s = assembly.stats
        raise ValueError(
            f"{cfg.data}: every group has zero advantage ({s.get('groups_zero_advantage', 0)} "
            f"of {s.get('groups', 0)} groups: all responses equally rewarded) or no response "
            "has tokens; nothing to train, no checkpoint written")
    sampling = df.select("rollout_id", "top_p", "top_k").unique("rollout_id", keep="first")
    assembly.rows = assembly.rows.join(sampling, on="rollout_id", how="left",
                                       maintain_order="left")
    return assembly, manifest


SAMPLING_COLUMNS = ("engine", "temperature", "top_p", "top_k")


def assemble_frame(cfg: TrainConfig, df: pl.DataFrame, kind: str) -> Any:
    """The `Assembly` `scope train` trains on, of the rows `df` of a `kind` table (a rollouts or
    scored table's rows are all policy rows). Also what dynamic sampling judges groups by."""
    from scope_data.assembly import assemble

    if kind != "corrected":
        df = df.with_columns(
            kind=pl.lit("policy"), source_rollout_id=pl.lit(None, pl.String),
            off_policy_start=pl.lit(None, pl.Int32), correct_status=pl.lit("not_corrected"))
    return assemble(df, cfg.algo, cfg.advantage, cfg.scale_rewards, cfg.prm_alpha,
                    tuple(cfg.accepted_statuses), soft_punish_cache=cfg.soft_punish_cache,
                    max_completion_len=cfg.completion_len(),
                    overlong_penalty_factor=cfg.overlong_penalty_factor)


def check_sampling(df: pl.DataFrame, temperature: float, where: str) -> None:
    """Refuse behaviour log-probs the trainer's ratio cannot use as pi_old.

    The ratio pi_theta / pi_old needs pi_old at the trainer's temperature over the full
    vocabulary, from one sampler. A table mixing engines or sampling parameters is refused
    (naming the values); rows sampled at another temperature carry log-probs of another
    distribution; rows sampled with top_p < 1 or top_k > 0 carry log-probs of the renormalised
    kept set (biased by the kept mass, TRL issue 6789). All ask for `--old-logprobs recompute`
    (or the sampling temperature).
    """
    cols = [c for c in SAMPLING_COLUMNS if c in df.columns]
    found = df.select(cols).unique().sort(cols, nulls_last=True)
    if found.height > 1:
        values = "; ".join(", ".join(f"{c}={v}" for c, v in zip(cols, row, strict=True))
                           for row in found.iter_rows())
        raise ValueError(f"{where}: rows were sampled by {found.height} different samplers "
                         f"({values}); their behaviour log-probs are not one pi_old: pass "
                         "--old-logprobs recompute")
    top_k = df["top_k"].fill_null(0).max() if "top_k" in df.columns else 0
    if top_k and top_k > 0:
        raise ValueError(
            f"{where}: rows were sampled with top_k {top_k}: their behaviour log-probs are of "
            "the renormalised top-k set, not of the policy (the ratio would be biased by the "
            "kept mass); pass --old-logprobs recompute")
    sampled = df.select("temperature", "top_p").unique().sort("temperature", "top_p")
    for t, top_p in sampled.iter_rows():
        if abs(t - temperature) > 1e-6:
            raise ValueError(
                f"{where}: rows were sampled at temperature {t:g} but the trainer computes "
                f"log-probs at {temperature:g}; their behaviour log-probs are not pi_old: pass "
                f"--temperature {t:g} or --old-logprobs recompute")
        if top_p < 1.0:
            raise ValueError(
                f"{where}: rows were sampled with top_p {top_p:g}: their behaviour log-probs are "
                "of the renormalised nucleus, not of the policy (the ratio would be biased by "
                "the kept mass); pass --old-logprobs recompute")
