"""`scope eval`: sample n responses per problem and measure accuracy, pass@k and diversity.

Generation is `pipelines.stages.generate.run` into `OUT/rollouts` (a normal rollouts table, so an
interrupted evaluation resumes and `scope inspect` reads it). Metrics, from the rollouts with
polars:

- accuracy: mean of `correct` over all samples (= mean avg@n when every problem has n samples);
- pass@k for k = 1..n: mean over problems of the unbiased estimator 1 - C(n-c,k)/C(n,k);
- mean response length in tokens and the truncation rate (finish_reason "length");
- diversity of each problem's group (`scope_data.diversity.group_diversity`), averaged over
  problems: distinct-1..4, 1 - self-BLEU, novel-equation share;
- for tasks with many right answers (countdown), solution-path diversity of each group's
  correct responses (`scope_data.diversity.path_diversity` of their canonical paths,
  `scope_data.tasks.solution_path`): distinct_paths and path_entropy (bits), averaged over that
  task's problems (path_entropy over problems with a correct response).

Writes `OUT/metrics.json` (the numbers and the config), `OUT/per_problem.parquet` (one row per
problem) and `OUT/samples.parquet` (one row per sample, the light columns); prints a summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import identity, option, storage_options_field
from scope_data.diversity import (
    DIVERSITY_KEYS,
    PATH_DIVERSITY_KEYS,
    group_diversity,
    pass_at_k,
    path_diversity,
)

METRICS_FILE = "metrics.json"
OUTPUT_NAMES = {"rollouts", METRICS_FILE, "per_problem.parquet", "samples.parquet"}
"""What `scope eval` writes into OUT (nothing else may be there: `claim_plain_folder`)."""


@dataclass
class EvalConfig:
    """Options of `scope eval` (generation options as in `scope generate`)."""

    model: str = option(help="policy engine: hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
                        "openai:<base_url>#<model>")
    problems: str = option(help="problems table folder (path or fsspec URL)", identity=False)
    out: str = option(help="output folder (rollouts/, metrics.json, *.parquet)", identity=False)
    n: int = option(4, help="samples per problem (pass@k for k = 1..n)")
    temperature: float = option(0.6, help="sampling temperature")
    top_p: float = option(1.0, help="nucleus sampling mass")
    max_new_tokens: int = option(256, help="response token budget")
    seed: int = option(0, help="base sampling seed")
    limit: int | None = option(None, help="only the first K problems")
    template: str = option("chat", help="chat | raw")
    round: int = option(0, help="round index stored in the rows")
    diversity_tokens: str = option("word", help="tokens for distinct-n and self-BLEU: word | char")
    # engine options, passed to `scope generate` as they are
    dtype: str | None = option(None, help="model dtype")
    device: str | None = option(None, help="hf engine device (cpu, cuda)", identity=False)
    batch_size: int = option(64, help="hf engine batch size", identity=False)
    gpu_memory_utilization: float | None = option(
        None, help="vllm: share of GPU memory to use", identity=False)
    max_model_len: int | None = option(None, help="context length cap", identity=False)
    tensor_parallel_size: int = option(1, help="vllm tensor parallelism", identity=False)
    engine_kwargs: dict[str, Any] = option(
        default_factory=dict, help="any other engine option, as a JSON object (e.g. vllm "
        '{"enforce_eager": true})', identity=False)
    storage_options: dict[str, Any] | None = storage_options_field()

    def check(self) -> None:
        """ValueError naming the first bad option (the generation ones as `scope generate`)."""
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.diversity_tokens not in ("word", "char"):
            raise ValueError("--diversity-tokens must be word or char, got "
                             f"{self.diversity_tokens!r}")
        generate_config(self).check()


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_problem: pl.DataFrame
    out: str


def summarize(rollouts: pl.DataFrame, tokens: str = "word") -> tuple[dict[str, Any], pl.DataFrame]:
    """Metrics of a rollouts frame (one row per sample) and the per-problem frame.

    Needs columns problem_id, sample_idx, correct, response_text, response_token_ids,
    finish_reason, status.
    """
    if rollouts.height == 0:
        raise ValueError("no rollouts to evaluate (empty table)")
    df = rollouts.sort("problem_id", "sample_idx").with_columns(
        pl.col("response_token_ids").list.len().alias("response_tokens")
    )
    groups = df.group_by("problem_id", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("n"),
        pl.col("correct").cast(pl.Int64).sum().alias("c"),
        pl.col("response_text"),
        pl.col("response_tokens").mean().alias("mean_tokens"),
    )
    n_max = int(groups["n"].max())
    diversity = pl.DataFrame([group_diversity(texts, tokens)
                              for texts in groups["response_text"].to_list()],
                             infer_schema_length=None)
    per_problem = groups.select(
        "problem_id", "n", "c", "mean_tokens",
        *(pass_at_k(k).alias(f"pass@{k}") for k in range(1, n_max + 1)),
    ).hstack(diversity)
    if "task" in df.columns and "prompt" in df.columns:
        per_problem = per_problem.hstack(_path_diversity(df))
    metrics: dict[str, Any] = {
        "problems": per_problem.height,
        "samples": df.height,
        "n": n_max,
        "accuracy": float(df["correct"].cast(pl.Float64).mean()),
        "avg@n": float((per_problem["c"] / per_problem["n"]).mean()),
        "mean_response_tokens": float(df["response_tokens"].mean()),
        "truncation_rate": float((df["finish_reason"] == "length").cast(pl.Float64).mean()),
        "bad_rows": int((df["status"] != "ok").sum()),
    }
    for k in range(1, n_max + 1):
        metrics[f"pass@{k}"] = _mean(per_problem[f"pass@{k}"])
    for key in DIVERSITY_KEYS:
        metrics[key] = _mean(per_problem[key])
    for key in PATH_DIVERSITY_KEYS:
        if key in per_problem.columns:
            metrics[key] = _mean(per_problem[key])
    return metrics, per_problem


def _path_diversity(df: pl.DataFrame) -> pl.DataFrame:
    """distinct_paths and path_entropy of each problem's correct responses (problems in the
    order of `summarize`'s groups); null for a task without solution paths."""
    from scope_data.tasks import has_paths, solution_path

    groups = df.group_by("problem_id", maintain_order=True).agg(
        pl.col("task").first(), pl.col("prompt").first(),
        pl.col("response_text").filter(pl.col("correct")).alias("correct_texts"),
    )
    rows = []
    for task, prompt, texts in groups.select("task", "prompt", "correct_texts").iter_rows():
        if not has_paths(task):
            rows.append(dict.fromkeys(PATH_DIVERSITY_KEYS))
            continue
        paths = [p for t in texts if (p := solution_path(task, prompt, t)) is not None]
        rows.append(path_diversity(paths))
    return pl.DataFrame(rows, schema={"distinct_paths": pl.Int64, "path_entropy": pl.Float64})


def _mean(col: pl.Series) -> float | None:
    value = col.drop_nulls().mean()
    return None if value is None else float(value)


def generate_config(cfg: EvalConfig) -> Any:
    """The `pipelines.stages.generate` config that samples this evaluation's rollouts: the
    options both configs have, the model as the policy, into `OUT/rollouts`."""
    from pipelines.stages.generate import GenerateConfig

    shared = {f.name for f in fields(GenerateConfig)} & {f.name for f in fields(cfg)} - {"out"}
    return GenerateConfig(**{k: getattr(cfg, k) for k in sorted(shared)}, policy=cfg.model,
                          out=str(Path(cfg.out) / "rollouts"))


def run(cfg: EvalConfig, quiet: bool = False) -> EvalResult:
    """Generate (or reuse) the rollouts, compute the metrics, write the files, print a summary."""
    from pipelines.stages import generate
    from scope_data.shards import scan

    cfg.check()
    from scope_data.hashing import config_hash
    from scope_data.ownership import claim_plain_folder

    chash = config_hash(identity(cfg))
    # OUT is new, empty or this config's earlier evaluation (never the problems table, nor a
    # metrics.json of another evaluation)
    claim_plain_folder(cfg.out, "scope eval", chash, OUTPUT_NAMES, METRICS_FILE, [cfg.problems],
                       cfg.storage_options)
    gen_cfg = generate_config(cfg)
    result = generate.run(gen_cfg, quiet=True)
    if result.manifest is None:
        raise RuntimeError(f"{gen_cfg.out}: {len(result.missing)} rollout parts still missing")
    rollouts = scan(gen_cfg.out, cfg.storage_options).collect()
    metrics, per_problem = summarize(rollouts, cfg.diversity_tokens)
    metrics["config"] = identity(cfg)  # its hash is `chash`: a rerun's ownership check
    write_outputs(cfg.out, metrics, per_problem, rollouts)
    if not quiet:
        print_metrics(f"scope eval: {cfg.model} on {cfg.problems}", metrics)
    return EvalResult(metrics, per_problem, cfg.out)


def write_outputs(out: str, metrics: dict[str, Any], per_problem: pl.DataFrame,
                  rollouts: pl.DataFrame) -> None:
    """metrics.json, per_problem.parquet and samples.parquet, each written atomically."""
    from scope_data.folder import Folder

    folder = Folder(out)
    light = rollouts.select(
        "problem_id", "rollout_id", "sample_idx", "prompt", "answer", "response_text",
        "pred_answer", "correct", "reward", "finish_reason", "status",
        pl.col("response_token_ids").list.len().alias("response_tokens"),
    )
    for name, frame in (("per_problem.parquet", per_problem), ("samples.parquet", light)):
        with folder.open_atomic(name) as f:
            frame.write_parquet(f)
    folder.write_text(METRICS_FILE, json.dumps(metrics, indent=1, default=str))


def read_metrics(out: str) -> dict[str, Any]:
    """The metrics.json of a finished evaluation."""
    from scope_data.folder import Folder

    return json.loads(Folder(out).read_text(METRICS_FILE))


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from pipelines.console import print_summary

    keys = ["problems", "samples", "accuracy"]
    keys += [f"pass@{k}" for k in range(1, metrics["n"] + 1)]
    keys += ["mean_response_tokens", "truncation_rate", *DIVERSITY_KEYS, *PATH_DIVERSITY_KEYS,
             "bad_rows"]
    print_summary(title, [(k, metrics[k]) for k in keys if metrics.get(k) is not None])
