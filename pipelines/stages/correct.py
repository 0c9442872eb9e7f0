"""`scope correct`: salvage failed rollouts with teacher-written suffixes (DESIGN.md 1, step 4).

Reads the scored table, picks which failed rollouts to correct (``scope_data.groups``), asks a
teacher (``pipelines.engines.teachers``) to continue each kept prefix, splices prefix ids + policy
re-encoding of the suffix (``scope_data.correction``), verifies the result and writes the
corrected table. ``--mode luffy`` ignores PRM scores, so it also reads the rollouts table (no
PRM runs; its rows get no steps, ``prm=""``, threshold NaN, ``score_status="not_scored"``):

- EVERY input row, ``kind="policy"``, with ``correct_status`` saying what happened to it
  (``not_failed``, ``not_scored``, ``prm_disagrees``, ``first_error_out_of_range``,
  ``no_prefix``, ``prefix_too_short``, ``over_group_limit``, ``group_has_correct``, or the
  outcome of its correction: ``accepted``, ``truncated``, ``rejected_wrong``
  (``scope_data.correction``), ``teacher_error``, ``empty_response``, ``no_reference``); its
  correction columns are null;
- after it, one ``kind="corrected"`` row per kept correction: a new ``rollout_id =
  stable_id(source_rollout_id, teacher, attempt)``, ``source_rollout_id``, ``prefix_steps``
  (k*), ``off_policy_start`` (= kept prefix tokens), ``teacher``, the spliced response, its
  verdict (``pred_answer``/``reward``/``correct``) and ``correct_status`` ``accepted`` (or
  ``truncated``: the suffix was cut to fit). With ``require_correct`` off, corrections whose
  answer is wrong are written too, as ``rejected_wrong``.

A corrected row keeps the source's problem/prompt columns and sampling temperature/top_p (they
describe the on-policy prefix); ``seed`` is the teacher's; ``behaviour_logprobs`` are the
prefix's followed by NaN (off-policy tokens); ``steps`` holds the kept prefix steps only, with
``first_error`` null and ``score_status="prefix_only"``. When the teacher stopped on its own the
policy's EOS id is appended (the rollouts table keeps EOS as the last token of a stopped
response), also with a NaN log-prob.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from pipelines.console import print_summary, progress
from pipelines.engines.fingerprint import model_fingerprint
from pipelines.engines.spec import load_tokenizer, parse_spec, policy_tokenizer_path
from pipelines.engines.teachers import Teacher, TeacherItem, TeacherOutput, load_teacher
from pipelines.executors.shard_executor import StageResult, run_stage
from scope_data.algos import CORRECTION_MODES, mode_needs_scores
from scope_data.correction import (
    CORRECTED_ROW_STATUSES,
    SALVAGE_RATE,
    check_prefix_text,
    check_step_offsets,
    outcome_status,
    prefix_token_end,
    salvage_rate,
    splice,
)
from scope_data.groups import (
    GROUP_HAS_CORRECT,
    OVER_GROUP_LIMIT,
    SELECTED,
    rescue_counts,
    select_corrections,
)
from scope_data.hashing import derive_seed, stable_id
from scope_data.schema import SCHEMAS, SCORED_FIELDS, conform
from scope_data.shards import read_manifest


@dataclass
class CorrectConfig:
    """Options of `scope correct` (TRL-like names for the sampling ones)."""

    scored: str
    out: str
    teacher: str
    mode: str = "scope"  # "scope" | "luffy" (teacher solves from scratch, k* ignored)
    min_prefix_steps: int = 1
    max_corrections_per_group: int = 1
    only_all_failed: bool = False  # correct only groups with no verified response (AMPO)
    require_correct: bool = True
    attempts: int = 1
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    template: str = "chat"  # teacher prompt rendering: "chat" | "raw"
    policy_tokenizer: str | None = None  # default: the model of the table's `policy` column
    max_response_tokens: int | None = None  # default: policy context - prompt length
    split_mode: str = "auto"  # how the `reference` teacher splits solutions
    batch_size: int = 64  # teacher items per call (one progress-bar update each)
    # teacher engine options (not part of the output's identity, except dtype)
    dtype: str | None = None
    device: str | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    teacher_tokenizer: str | None = None  # openai: tokenizer folder (default: the model name)
    cache_dir: str | None = None  # openai request cache (default as `scope generate`)
    max_concurrency: int = 16
    trust_remote_code: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"llm_kwargs": {...}}
    num_shards: int = 1
    shard_index: int | None = None
    storage_options: dict[str, Any] | None = None

    def manifest_config(self) -> dict[str, Any]:
        """What the corrected table depends on: hashed into the table's config."""
        keys = ("teacher", "mode", "min_prefix_steps", "max_corrections_per_group",
                "only_all_failed", "require_correct", "attempts", "max_new_tokens", "temperature",
                "top_p", "seed", "template", "policy_tokenizer", "max_response_tokens",
                "split_mode", "dtype")
        return {"stage": "correct", **{k: getattr(self, k) for k in keys},
                "teacher_fingerprint": model_fingerprint(self.teacher, "teacher")}

    def teacher_engine_options(self) -> dict[str, Any]:
        from pipelines.stages.generate import default_cache_dir

        opts = {
            "dtype": self.dtype, "device": self.device, "batch_size": self.batch_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len, "tokenizer": self.teacher_tokenizer,
            "cache_dir": self.cache_dir or default_cache_dir(self.out),
            "max_concurrency": self.max_concurrency,
            "trust_remote_code": self.trust_remote_code or None,
        }
        return {**{k: v for k, v in opts.items() if v is not None}, **self.engine_options}

    def check(self) -> None:
        parse_spec(self.teacher, "teacher")
        if self.mode not in CORRECTION_MODES:
            raise ValueError(f"--mode must be one of {', '.join(CORRECTION_MODES)}, "
                             f"got {self.mode!r}")
        for name in ("attempts", "max_corrections_per_group", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.min_prefix_steps < 0:
            raise ValueError("--min-prefix-steps must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.template not in ("chat", "raw"):
            raise ValueError(f"--template must be chat or raw, got {self.template!r}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError("--max-response-tokens must be >= 1")


def verify(row: dict[str, Any], text: str) -> tuple[str | None, bool]:
    """(pred_answer, correct) of a corrected response, graded as `scope generate` grades."""
    from pipelines.stages.generate import grade_response

    pred, ok, _ = grade_response(row["task"], row["prompt"], row["answer"], text)
    return pred, bool(ok)


class _Corrector:
    """State shared across shards: the teacher and the policy tokenizer, loaded once."""

    def __init__(self, cfg: CorrectConfig) -> None:
        self.cfg = cfg
        self.teacher: Teacher | None = None
        self.tokenizer: Any = None
        self.teacher_name = cfg.teacher

    def load(self, policies: list[str]) -> None:
        if self.tokenizer is None:
            if self.cfg.policy_tokenizer is None and len(set(policies)) > 1:
                raise ValueError(
                    f"the input table holds several policies ({sorted(set(policies))[:3]}); "
                    "pass --policy-tokenizer"
                )
            path = policy_tokenizer_path(policies[0], self.cfg.policy_tokenizer)
            try:
                self.tokenizer = load_tokenizer(path)
            except OSError as e:
                raise FileNotFoundError(f"cannot load the policy tokenizer {path!r} (pass "
                                        f"--policy-tokenizer): {e}") from None
        if self.teacher is None:
            c = self.cfg
            self.teacher = load_teacher(
                c.teacher, policy_tokenizer=self.tokenizer, template=c.template,
                temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                split_mode=c.split_mode, engine_options=c.teacher_engine_options(),
            )
            self.teacher_name = self.teacher.name

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()

    # -- tokenizer helpers ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def max_tokens(self, row: dict[str, Any]) -> int | None:
        if self.cfg.max_response_tokens is not None:
            return self.cfg.max_response_tokens
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000:
            return max(1, limit - len(row["prompt_token_ids"]))
        return None

    # -- one shard ------------------------------------------------------------------------------
    def process(self, rows: pa.Table, shard_index: int) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.cfg
        if "steps" not in rows.column_names:
            rows = not_scored(rows)
        records = rows.to_pylist()
        if not records:
            return SCHEMAS["corrected"].empty_table(), {"rollouts": 0}
        sel = select_corrections(
            pl.from_arrow(rows), mode=cfg.mode, min_prefix_steps=cfg.min_prefix_steps,
            max_corrections_per_group=cfg.max_corrections_per_group,
            only_all_failed=cfg.only_all_failed,
        )
        for row in records:
            if row["steps"]:
                check_step_offsets(row["rollout_id"], row["steps"],
                                   len(row["response_token_ids"]), len(row["behaviour_logprobs"]))
        status = dict(zip(sel["rollout_id"], sel["selection"], strict=True))
        eligible = sum(s in (SELECTED, OVER_GROUP_LIMIT, GROUP_HAS_CORRECT)
                       for s in status.values())
        k_of = dict(zip(sel["rollout_id"], sel["prefix_steps"], strict=True))
        chosen = [r for r in records if status[r["rollout_id"]] == SELECTED]
        corrections: dict[str, dict[str, Any]] = {}
        attempts_used = 0
        if chosen:
            self.load([r["policy"] for r in records])
            items = [self.item(r, k_of[r["rollout_id"]]) for r in chosen]
            corrections, attempts_used = self.correct_all(chosen, items)
            for rid, corr in corrections.items():
                status[rid] = corr["correct_status"]
        out_rows = []
        for row in records:
            out_rows.append({**row, "kind": "policy", "source_rollout_id": None,
                             "prefix_steps": None, "off_policy_start": None, "teacher": None,
                             "correct_status": status[row["rollout_id"]]})
            corr = corrections.get(row["rollout_id"])
            if corr is not None and (corr["correct"] or not cfg.require_correct):
                if corr["correct_status"] in CORRECTED_ROW_STATUSES:
                    out_rows.append(corr)
        table = pa.Table.from_pylist(out_rows, schema=SCHEMAS["corrected"])
        stats = self.stats(records, status, out_rows, attempts_used)
        return table, {**stats, "eligible": eligible, "attempted": len(chosen)}

    def item(self, row: dict[str, Any], k: int) -> TeacherItem:
        """The kept prefix of a selected row (empty in luffy mode), checked against its text."""
        rid = row["rollout_id"]
        if self.cfg.mode == "luffy":
            return TeacherItem(row, "", [], 0)
        end = prefix_token_end(row["steps"], k)
        ids = list(row["response_token_ids"][:end])
        text = self.decode(ids)
        if self.decode(list(row["response_token_ids"])) == row["response_text"]:
            check_prefix_text(rid, text, row["response_text"], row["steps"][k]["char_start"])
        return TeacherItem(row, text, ids, k)

    def correct_all(
        self, rows: list[dict[str, Any]], items: list[TeacherItem]
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Up to `attempts` teacher calls per item; the first verified correction wins."""
        cfg, teacher = self.cfg, self.teacher
        assert teacher is not None
        result: dict[str, dict[str, Any]] = {}
        pending = list(range(len(items)))
        used = 0
        with progress() as bar:
            task = bar.add_task(f"correct ({self.teacher_name})", total=len(items) * cfg.attempts)
            for attempt in range(cfg.attempts):
                for start in range(0, len(pending), cfg.batch_size):
                    batch = pending[start : start + cfg.batch_size]
                    for i in batch:
                        items[i].seed = derive_seed(cfg.seed, rows[i]["rollout_id"], attempt)
                    outputs = teacher.continue_batch([items[i] for i in batch])
                    used += len(batch)
                    for i, out in zip(batch, outputs, strict=True):
                        result[rows[i]["rollout_id"]] = self.corrected_row(
                            rows[i], items[i], out, attempt
                        )
                    bar.advance(task, len(batch))
                pending = [i for i in pending if not result[rows[i]["rollout_id"]]["correct"]]
                if not pending or teacher.deterministic:
                    break
        return result, used

    def corrected_row(
        self, row: dict[str, Any], item: TeacherItem, out: TeacherOutput, attempt: int
    ) -> dict[str, Any]:
        """The corrected row for one teacher output (status carries any failure)."""
        k = item.prefix_steps
        base = {**row, "kind": "corrected", "source_rollout_id": row["rollout_id"],
                "rollout_id": stable_id(row["rollout_id"], self.teacher_name, attempt),
                "prefix_steps": k, "off_policy_start": len(item.prefix_token_ids),
                "teacher": self.teacher_name, "seed": item.seed,
                "steps": list(row["steps"][:k]) if self.cfg.mode == "scope" else [],
                "first_error": None, "score_status": "prefix_only", "status": "ok",
                "correct": False, "reward": 0.0, "pred_answer": None}
        if out.status != "ok":
            return {**base, "correct_status": out.status}
        prefix_lp = list(row["behaviour_logprobs"][: len(item.prefix_token_ids)])
        eos = self.tokenizer.eos_token_id if out.finish_reason == "stop" else None
        sp = splice(item.prefix_token_ids, prefix_lp, out.text, self.encode, self.decode,
                    max_response_tokens=self.max_tokens(row), eos_token_id=eos)
        pred, ok = verify(row, sp.response_text)
        finish = "length" if sp.status == "truncated" else out.finish_reason
        status = outcome_status(ok, sp.status == "truncated")
        return {**base, "response_text": sp.response_text,
                "response_token_ids": sp.response_token_ids,
                "behaviour_logprobs": sp.behaviour_logprobs, "finish_reason": finish,
                "off_policy_start": sp.off_policy_start, "pred_answer": pred,
                "reward": 1.0 if ok else 0.0, "correct": ok, "correct_status": status}

    def stats(self, records: list[dict[str, Any]], status: dict[str, str],
              out_rows: list[dict[str, Any]], attempts_used: int) -> dict[str, Any]:
        corrected = [r for r in out_rows if r["kind"] == "corrected"]
        good = [r for r in corrected if r["correct"]]
        source_len = {r["rollout_id"]: len(r["response_token_ids"]) for r in records}
        share = sum(r["off_policy_start"] / max(1, source_len[r["source_rollout_id"]])
                    for r in good)
        groups = rescue_counts(pl.DataFrame(
            [{k: r[k] for k in ("problem_id", "kind", "correct")} for r in out_rows]
        ))
        return {
            "rollouts": len(records), "failed": sum(not r["correct"] for r in records),
            "teacher_calls": attempts_used,
            "accepted": len(good), "corrected_rows": len(corrected),
            "prefix_share_sum": share,
            "prefix_tokens_sum": sum(r["off_policy_start"] for r in good),
            **groups,
            "correct_status": dict(Counter(status.values())),
        }


def not_scored(rows: pa.Table) -> pa.Table:
    """A rollouts table as a scored table whose rows no PRM scored: no steps, first_error null,
    prm "", threshold NaN, score_status ``not_scored``."""
    n = rows.num_rows
    fill = {"steps": pa.array([[]] * n, SCORED_FIELDS[0].type),
            "first_error": pa.nulls(n, pa.int32()), "prm": pa.array([""] * n, pa.string()),
            "threshold": pa.array([math.nan] * n, pa.float32()),
            "score_status": pa.array(["not_scored"] * n, pa.string())}
    for name, column in fill.items():
        rows = rows.append_column(name, column)
    return conform("scored", rows)


def summary_rows(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """The one-screen summary of a correct run from its (manifest) stats."""
    attempted, accepted = stats.get("attempted", 0), stats.get("accepted", 0)
    salvage = salvage_rate(accepted, stats.get("failed", 0))
    return [
        ("rollouts", stats.get("rollouts", 0)),
        ("failed rollouts", stats.get("failed", 0)),
        ("eligible", stats.get("eligible", 0)),
        ("attempted", attempted),
        ("teacher calls", stats.get("teacher_calls", 0)),
        ("accepted (verified corrections)", accepted),
        ("accepted / attempted", accepted / attempted if attempted else math.nan),
        (f"salvage rate ({SALVAGE_RATE})", math.nan if salvage is None else salvage),
        ("mean kept-prefix share (tokens)",
         stats.get("prefix_share_sum", 0.0) / accepted if accepted else math.nan),
        ("groups with zero correct", stats.get("groups_all_failed", 0)),
        ("rescued groups", stats.get("groups_rescued", 0)),
        ("correct_status", stats.get("correct_status", {})),
    ]


def run(cfg: CorrectConfig) -> StageResult:
    """Run the correct stage over the table at ``cfg.scored`` (the scored table; a rollouts
    table too in a mode that needs no PRM scores, ``luffy``); write ``cfg.out``."""
    cfg.check()
    upstream = read_manifest(cfg.scored, cfg.storage_options)
    readable = ("scored",) if mode_needs_scores(cfg.mode) else ("rollouts", "scored")
    if upstream.table not in readable:
        raise ValueError(
            f"--scored {cfg.scored} holds a {upstream.table!r} table; scope correct --mode "
            f"{cfg.mode} reads {' or '.join(readable)} tables (`scope score` writes the scored "
            "one)"
        )
    corrector = _Corrector(cfg)
    try:
        result = run_stage(
            input_url=cfg.scored, output_url=cfg.out, output_table="corrected",
            # `mode` recorded explicitly: `scope train` checks it against its algo
            config={**cfg.manifest_config(), "mode": cfg.mode}, process=corrector.process,
            num_shards=cfg.num_shards, shard_index=cfg.shard_index,
            storage_options=cfg.storage_options,
        )
    finally:
        corrector.close()
    stats = result.manifest.stats if result.manifest is not None else result.stats
    title = f"correct ({cfg.mode}, teacher {corrector.teacher_name}) -> {cfg.out}"
    if result.manifest is None:
        title += f"  [{len(result.missing)} parts still missing]"
    print_summary(title, summary_rows(stats))
    return result
