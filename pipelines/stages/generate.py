"""`scope generate`: sample n responses per problem with the policy, grade them, write rollouts.

Per problem: render the prompt (`engines.prompts`, chat template or raw), tokenise it, and send
one request per sample i = 0..n-1 with seed derive_seed(seed, problem_id, i) (n = 1 each, so a
sample's seed, hence its tokens with the hf engine, does not depend on n, the batch or the shard;
vLLM's prefix cache makes the repeated prompt cheap). Each response is graded: arith problems by
the exact checker (`scope_data.tasks.arith`, problem parsed from the prompt), others by
`scope_data.grading.grade`. reward = 1.0 if correct else 0.0.

Rows keep a status: `ok`; `prompt_too_long` (the prompt leaves no room in the model context: not
sent, n rows written with empty responses and finish_reason "not_sent"); `empty_response` (no
text); `grader_timeout` / `grader_error` (math grading failed). The stage runs through
`executors.shard_executor.run_stage`: part files per shard, skipped when already written
with the same config, so a rerun after a crash regenerates only the missing parts; an engine
error (e.g. a remote endpoint that stays down) writes nothing for that part and no manifest.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.console import part_task, print_summary, progress
from pipelines.engines.base import GenerationRequest, load_generation_engine, parse_spec
from pipelines.engines.fingerprint import model_fingerprint
from pipelines.engines.prompts import TEMPLATES, render_and_encode
from pipelines.executors.shard_executor import StageResult, run_stage
from scope_data.hashing import derive_seed, stable_id
from scope_data.schema import empty_table

CHUNK = 256  # requests per engine call (one progress-bar update each); engines may set
# `chunk_size` (vLLM: larger, so continuous batching is not cut at chunk boundaries)


@dataclass
class GenerateConfig:
    """Options of `scope generate` (names follow TRL/vLLM where they exist)."""

    problems: str
    policy: str
    out: str
    n: int = 8
    round: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    limit: int | None = None
    template: str = "chat"
    num_shards: int = 1
    shard_index: int | None = None
    # engine options (not part of the output's identity, except dtype)
    dtype: str | None = None
    device: str | None = None
    batch_size: int = 64
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    cache_dir: str | None = None
    max_concurrency: int = 16
    tokenizer: str | None = None  # openai: the policy tokenizer (default: the model name)
    trust_remote_code: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # any other engine option
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def identity(self) -> dict[str, Any]:
        """What the rollouts depend on (policy weights included): hashed into the config."""
        keys = ("policy", "n", "round", "temperature", "top_p", "max_new_tokens", "seed",
                "limit", "template", "dtype")
        return {**{k: asdict(self)[k] for k in keys},
                "policy_fingerprint": model_fingerprint(self.policy)}

    def engine_options(self) -> dict[str, Any]:
        opts = {
            "dtype": self.dtype, "device": self.device, "batch_size": self.batch_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "cache_dir": self.cache_dir or default_cache_dir(self.out),
            "max_concurrency": self.max_concurrency, "tokenizer": self.tokenizer,
            "trust_remote_code": self.trust_remote_code,
        }
        return {**{k: v for k, v in opts.items() if v is not None}, **self.engine_kwargs}

    def check(self) -> None:
        parse_spec(self.policy, "generation")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def default_cache_dir(out: str) -> str:
    """Where the openai engine caches responses: `<out>/_request_cache` for a local output
    folder (a rerun of this stage re-sends nothing; other runs never see its replies), else
    `$SCOPE_CACHE/requests` (default `~/.cache/scope/requests`). `--cache-dir` shares one."""
    if "://" not in out:
        return str(Path(out) / "_request_cache")
    return str(Path(os.environ.get("SCOPE_CACHE") or Path.home() / ".cache" / "scope")
               / "requests")


def grade_response(task: str, prompt: str, answer: str, text: str) -> tuple[str | None, bool, str]:
    """(pred_answer, correct, status) of one non-empty response."""
    if task == "arith":
        from scope_data.tasks import arith

        try:
            problem = arith.parse_prompt(prompt)
        except ValueError:
            problem = None
        if problem is not None:
            return arith.extract_answer(text), arith.is_correct(problem, text), "ok"
    from scope_data.grading import grade

    g = grade(text, answer)
    status = g.status if g.status in ("grader_timeout", "grader_error") else "ok"
    return g.pred_answer, g.correct, status


class _Generator:
    """The `process` function of the stage: owns the engine (loaded on first use)."""

    def __init__(self, cfg: GenerateConfig, bar: Any):
        self.cfg, self.bar, self.engine = cfg, bar, None
        self.policy = str(parse_spec(cfg.policy, "generation"))

    def __call__(self, rows: pa.Table, shard_index: int) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.cfg
        if self.engine is None:
            self.engine = load_generation_engine(cfg.policy, **cfg.engine_options())
        problems = rows.to_pylist()
        texts, ids = render_and_encode(self.engine.tokenizer, [p["prompt"] for p in problems],
                                       cfg.template)
        fits = [len(x) < self.engine.max_model_len for x in ids]
        jobs = [(i, s) for i, ok in enumerate(fits) if ok for s in range(cfg.n)]
        requests = [
            GenerationRequest(ids[i], n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens,
                              seed=derive_seed(cfg.seed, problems[i]["problem_id"], s))
            for i, s in jobs
        ]
        task = part_task(self.bar, f"generate part {shard_index}", len(requests))
        results = []
        t0 = time.perf_counter()
        chunk = getattr(self.engine, "chunk_size", CHUNK)
        for start in range(0, len(requests), chunk):
            results += [r[0] for r in self.engine.generate(requests[start : start + chunk])]
            self.bar.update(task, advance=len(results) - start)
        seconds = time.perf_counter() - t0
        by_job = dict(zip(jobs, results, strict=True))
        out, stats = [], {"status": {}, "problems": len(problems), "responses": 0, "correct": 0,
                          "response_tokens": 0, "truncated": 0, "generate_seconds": seconds}
        for i, p in enumerate(problems):
            for s in range(cfg.n):
                seed = derive_seed(cfg.seed, p["problem_id"], s)
                row = {**p, "rollout_id": stable_id(p["problem_id"], cfg.round, s, seed),
                       "round": cfg.round, "sample_idx": s, "policy": self.policy,
                       "prompt_text": texts[i], "prompt_token_ids": ids[i],
                       "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed}
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
        pred, correct, status = grade_response(p["task"], p["prompt"], p["answer"], r.text)
        stats["correct"] += bool(correct)
        return {**fields, "pred_answer": pred, "reward": float(correct), "correct": correct,
                "status": status}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def run(cfg: GenerateConfig, quiet: bool = False) -> StageResult:
    """Generate, grade and write the rollouts table at `cfg.out`; resumable by part."""
    cfg.check()
    t0 = time.perf_counter()
    with progress() as bar:
        gen = _Generator(cfg, bar)
        try:
            result = run_stage(
                input_url=cfg.problems, output_url=cfg.out, output_table="rollouts",
                config={"stage": "generate", **cfg.identity()}, process=gen,
                num_shards=cfg.num_shards, shard_index=cfg.shard_index,
                storage_options=cfg.storage_options, limit=cfg.limit,
            )
        finally:
            gen.close()
    if not quiet:
        print_summary("scope generate", summary_rows(result, time.perf_counter() - t0, cfg))
    return result


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
