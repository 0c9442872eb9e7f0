"""`scope score`: split responses into steps, score them with a PRM, locate first errors.

Reads a rollouts table and writes the scored table (DESIGN.md section 3): every input column
plus ``steps`` (text, char and token offsets, score), ``first_error``, ``prm``, ``threshold`` and
``score_status``. Steps use ``blank_line`` splitting, ``newline`` for arith and countdown
(``step_mode`` overrides). Token offsets index ``response_token_ids`` and come from the POLICY
tokenizer (the rollouts' ``policy`` spec ``hf:/path``/``vllm:/path``, or ``tokenizer``).

Statuses: ``ok``; ``skipped`` (a correct response under ``only_failed``: steps kept, no score,
first_error null); ``no_steps`` (empty response); ``truncated`` (longer than the PRM context:
tail steps NaN); ``nan`` (the PRM gave a non-finite score). ``first_error`` is the first step
below the threshold, -1 when none, and null when a NaN before it (or anywhere, when none is
found) leaves it undetermined: a NaN is never an error, and a hidden error is never guessed. A
failed response with no step below the threshold and no final answer (it stopped early) gets
``first_error = len(steps)``: its first MISSING step is the error, every written step is kept.

``threshold="auto"`` tunes tau for ProcessBench F1 on ``tune_on`` (a ProcessBench-format file
scored with the same PRM) or, for rollouts of an exact task (arith, countdown) without one, on
the shard's own scored rows labelled by the task's exact checker (rows whose gold index is past
their last step are left out).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.config import (
    manifest_config,
    num_shards_field,
    option,
    shard_index_field,
    storage_options_field,
)
from pipelines.console import part_task, print_summary, progress
from pipelines.engines.base import PRMEngine, load_prm, score_with_status
from pipelines.engines.prm_options import PRM_HELP, PRM_OPTIONS_HELP, PRMOptions
from pipelines.engines.spec import load_tokenizer, parse_spec, policy_tokenizer_path
from pipelines.executors.base import EXECUTION_HELP, ExecutorOptions, sharded
from pipelines.executors.shard_executor import BATCH_ROWS, StageResult, run_stage
from scope_data.first_error import locate_determined, tune_threshold
from scope_data.schema import SCORED_FIELDS, conform
from scope_data.shards import read_manifest
from scope_data.steps import char_to_token_spans, split_mode_for, split_steps
from scope_data.tasks import EXACT_TASKS, gold_first_error

SCORED_COLUMNS = [f.name for f in SCORED_FIELDS]
POSITION_BINS = ("0-20%", "20-40%", "40-60%", "60-80%", "80-100%")


@dataclass
class ScoreConfig:
    """Options of `scope score` (see the module docstring)."""

    rollouts: str = option(help="rollouts table folder (path or fsspec URL)", identity=False)
    out: str = option(help="output scored table folder", identity=False)
    prm: str = option("rule:arith", help=PRM_HELP, model="prm")
    threshold: float | str = option(
        0.5, help="first error = first step with score below this; 'auto' tunes it for "
        "ProcessBench F1 (on --tune-on, or on arith/countdown rollouts' checker labels)")
    only_failed: bool = option(True, flags="--only-failed/--all",
                               help="score only rollouts with a wrong final answer")
    step_mode: str | None = option(
        None, help="newline | blank_line (default: newline for arith and countdown, blank_line "
        "otherwise)")
    tokenizer: str | None = option(
        None, help="policy tokenizer for token offsets (default: from the rollouts' policy column)")
    tune_on: str | None = option(None, help="ProcessBench-format file to tune --threshold auto on")
    prm_options: dict[str, Any] = option(default_factory=dict, expand=PRMOptions,
                                         help=PRM_OPTIONS_HELP)
    batch_size: int = option(256, help="responses per PRM call", identity=False)
    num_shards: int = num_shards_field()
    shard_index: int | None = shard_index_field()
    execution: dict[str, Any] = option(default_factory=dict, expand=ExecutorOptions,
                                       identity=False, help=EXECUTION_HELP)
    storage_options: dict[str, Any] | None = storage_options_field()

    def check(self) -> None:
        parse_spec(self.prm, "prm")
        if self.threshold != "auto":
            try:
                self.threshold = float(self.threshold)
            except (TypeError, ValueError):
                raise ValueError(
                    f"--threshold must be a number or 'auto', got {self.threshold!r}"
                ) from None
            if not 0 <= self.threshold <= 1:  # NaN fails too
                raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.step_mode not in (None, "newline", "blank_line"):
            raise ValueError(f"--step-mode must be newline or blank_line, got {self.step_mode!r}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


# -- token offsets ---------------------------------------------------------------------------
def token_offsets(tok: Any, text: str, token_ids: list[int], rollout_id: str
                  ) -> list[tuple[int, int]]:
    """(char_start, char_end) in `text` of each of `token_ids` (special tokens zero-width).

    Fast path: re-tokenising the text gives the ids (special tokens such as EOS aside). Else
    the ids are decoded one prefix at a time. ValueError names the rollout if neither aligns.
    """
    special = set(getattr(tok, "all_special_ids", []) or [])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    plain = [t for t in token_ids if t not in special]
    if list(enc["input_ids"]) == plain:
        it = iter(enc["offset_mapping"])
        out, end = [], 0
        for t in token_ids:
            if t in special:
                out.append((end, end))
            else:
                start, end = next(it)
                out.append((int(start), int(end)))
        return out
    vocab = len(tok)
    if bad := next((t for t in token_ids if not 0 <= t < vocab), None):
        raise ValueError(f"rollout {rollout_id}: response_token_ids hold {bad}, outside the "
                         f"policy vocabulary [0, {vocab})")
    out, end = [], 0
    for k in range(len(token_ids)):
        prefix = tok.decode(token_ids[: k + 1], skip_special_tokens=True)
        if text.startswith(prefix) and len(prefix) >= end:
            out.append((end, len(prefix)))
            end = len(prefix)
        else:  # an incomplete multi-byte character: zero-width until it completes
            out.append((end, end))
    if tok.decode(token_ids, skip_special_tokens=True) != text or end != len(text):
        raise ValueError(
            f"rollout {rollout_id}: response_token_ids do not decode to response_text with the "
            "policy tokenizer; pass --tokenizer with the tokenizer that generated the rollouts"
        )
    return out


class _Tokenizers:
    """The policy tokenizer of each `policy` value (`engines.spec` resolves and caches)."""

    def __init__(self, override: str | None):
        self.override, self.cache = override, {}

    def get(self, policy: str, rollout_id: str) -> Any:
        if policy not in self.cache:
            path = policy_tokenizer_path(policy, self.override)
            try:
                self.cache[policy] = load_tokenizer(path, local_only=self.override is None)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"rollout {rollout_id}: cannot load the policy tokenizer {path!r} ({e}); "
                    "pass --tokenizer PATH"
                ) from None
        return self.cache[policy]


# -- the stage -------------------------------------------------------------------------------
def _position_bin(k: int, n: int) -> str:
    return POSITION_BINS[min(len(POSITION_BINS) - 1, int(5 * k / max(n, 1)))]


def processbench_labelled(prm: PRMEngine, path: str) -> list[tuple[list[float], int]]:
    """(scores, label) of every record of a ProcessBench-format file, scored by `prm`."""
    from scope_data.benchmarks import load_benchmark

    bench = load_benchmark(path)
    results = score_with_status(prm, [(p, s) for p, s, _ in bench.items])
    return [(r.scores, g) for r, (_, _, g) in zip(results, bench.items, strict=True)]


class _Scorer:
    def __init__(self, cfg: ScoreConfig, prm: PRMEngine | None, quiet: bool):
        self.cfg, self._prm, self.quiet = cfg, prm, quiet
        self.bar: Any = None  # the stage's progress display, set by `run`
        self.tokenizers = _Tokenizers(cfg.tokenizer)
        self.threshold: float | None = None if cfg.threshold == "auto" else float(cfg.threshold)

    @property
    def prm(self) -> PRMEngine:
        if self._prm is None:
            self._prm = load_prm(self.cfg.prm, **self.cfg.prm_options)
        return self._prm

    def process(self, rows: pa.Table, shard_index: int) -> tuple[pa.Table, dict[str, Any]]:
        t0 = time.perf_counter()  # score_seconds: steps, token spans and PRM calls of the rows
        rows = rows.drop_columns([c for c in SCORED_COLUMNS if c in rows.column_names])
        cols = {c: rows.column(c).to_pylist() for c in (
            "rollout_id", "task", "prompt", "response_text", "response_token_ids", "policy",
            "correct", "pred_answer")}
        n = rows.num_rows
        steps_col: list[list[dict[str, Any]]] = []
        status = ["ok"] * n
        todo: list[int] = []
        for i in range(n):
            mode = split_mode_for(cols["task"][i], self.cfg.step_mode)
            steps = split_steps(cols["response_text"][i], mode)
            spans: list[tuple[int, int]] = []
            if steps:
                tok = self.tokenizers.get(cols["policy"][i], cols["rollout_id"][i])
                offsets = token_offsets(tok, cols["response_text"][i],
                                        list(cols["response_token_ids"][i]), cols["rollout_id"][i])
                spans = char_to_token_spans(steps, offsets)
            steps_col.append([
                {"text": s.text, "char_start": s.char_start, "char_end": s.char_end,
                 "token_start": a, "token_end": b, "score": None}
                for s, (a, b) in zip(steps, spans, strict=True)
            ])
            if not steps:
                status[i] = "no_steps"
            elif self.cfg.only_failed and cols["correct"][i]:
                status[i] = "skipped"
            else:
                todo.append(i)
        scores: dict[int, list[float]] = {}
        task = part_task(self.bar, f"scoring part {shard_index}", len(todo))
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start : start + self.cfg.batch_size]
            items = [(cols["prompt"][i], [s["text"] for s in steps_col[i]]) for i in chunk]
            for i, res in zip(chunk, score_with_status(self.prm, items), strict=True):
                scores[i] = res.scores
                status[i] = res.status
            self.bar.advance(task, len(chunk))
        tau = self.threshold
        stats: dict[str, Any] = {}
        if tau is None:  # auto without --tune-on: rows labelled by the task's exact checker
            labelled = []
            for i in todo:
                gold = gold_first_error(cols["task"][i], cols["prompt"][i],
                                        cols["response_text"][i])
                if gold < len(scores[i]):
                    labelled.append((scores[i], gold))
            tau = tune_threshold(labelled)
            stats["auto_threshold_rows"] = len(labelled)
        first_error: list[int | None] = [None] * n
        hist: Counter[str] = Counter()
        disagree = {"correct_answer_low_step": 0, "wrong_answer_no_low_step": 0}
        for i, s in scores.items():
            for step, x in zip(steps_col[i], s, strict=True):
                step["score"] = None if math.isnan(x) else x
            k = locate_determined(s, tau)
            if k == -1 and not cols["correct"][i] and cols["pred_answer"][i] is None:
                k = len(s)  # every step right, no answer: the first missing step is the error
            first_error[i] = k
            if k is None:
                hist["undetermined"] += 1
            elif k == -1:
                hist["none"] += 1
                disagree["wrong_answer_no_low_step"] += not cols["correct"][i]
            elif k == len(s):
                hist["unfinished"] += 1
            else:
                hist[_position_bin(k, len(s))] += 1
                disagree["correct_answer_low_step"] += bool(cols["correct"][i])
        out = rows.append_column("steps", pa.array(steps_col, SCORED_FIELDS[0].type))
        out = out.append_column("first_error", pa.array(first_error, pa.int32()))
        out = out.append_column("prm", pa.array([str(self.prm_name)] * n, pa.string()))
        out = out.append_column("threshold", pa.array([tau] * n, pa.float32()))
        out = out.append_column("score_status", pa.array(status, pa.string()))
        stats.update({
            "status": dict(Counter(status)), "scored": len(todo),
            "steps_scored": sum(len(s) for s in scores.values()),
            # the budget measure of PRM compute: response tokens of the rows it scored
            "prm_tokens": sum(len(cols["response_token_ids"][i]) for i in todo),
            "first_error_position": dict(hist), "disagree": disagree,
            "score_seconds": time.perf_counter() - t0,
        })
        return conform("scored", out, f"part {shard_index}"), stats

    @property
    def prm_name(self) -> str:
        return str(self._prm.spec) if self._prm is not None else self.cfg.prm


@sharded("score")
def run(cfg: ScoreConfig, prm: PRMEngine | None = None, quiet: bool = False) -> StageResult:
    """Score the rollouts at `cfg.rollouts` into the scored table at `cfg.out` (resumable).

    `prm` overrides `cfg.prm` with an engine instance (tests, custom PRMs).
    """
    cfg.check()
    upstream = read_manifest(cfg.rollouts, cfg.storage_options)
    if upstream.table not in ("rollouts", "scored"):
        raise ValueError(
            f"--rollouts {cfg.rollouts} holds a {upstream.table!r} table; scope score reads "
            "the rollouts table written by `scope generate`"
        )
    scorer = _Scorer(cfg, prm, quiet)
    config = manifest_config("score", cfg)
    if prm is not None:
        config["prm"] = str(prm.spec)
    if cfg.threshold == "auto" and cfg.tune_on:
        scorer.threshold = tune_threshold(processbench_labelled(scorer.prm, cfg.tune_on))
        config["tuned_threshold"] = scorer.threshold
    elif cfg.threshold == "auto":
        from scope_data.shards import scan

        tasks = scan(cfg.rollouts, cfg.storage_options).select("task").unique().collect()
        if set(tasks["task"].to_list()) - set(EXACT_TASKS):
            raise ValueError("--threshold auto needs --tune-on FILE (ProcessBench format) unless "
                             f"every rollout is of an exact task ({', '.join(EXACT_TASKS)})")
    with progress() as bar:
        scorer.bar = bar
        result = run_stage(  # tau tuned on a shard's own rows: the shard is one batch
            input_url=cfg.rollouts, output_url=cfg.out, output_table="scored", config=config,
            process=scorer.process, num_shards=cfg.num_shards, shard_index=cfg.shard_index,
            storage_options=cfg.storage_options,
            batch_rows=BATCH_ROWS if scorer.threshold is not None else None,
        )
    if not quiet:
        _summary(cfg, result, scorer)
    return result


def _summary(cfg: ScoreConfig, result: StageResult, scorer: _Scorer) -> None:
    stats = result.manifest.stats if result.manifest is not None else result.stats
    print_summary("scope score", [
        ("output", cfg.out), ("prm", scorer.prm_name),
        ("threshold", cfg.threshold if scorer.threshold is None else scorer.threshold),
        ("parts written / skipped", f"{result.parts_written} / {result.parts_skipped}"),
        ("rows scored", stats.get("scored", 0)), ("steps scored", stats.get("steps_scored", 0)),
        ("score_status", stats.get("status", {})),
        ("first error (relative position)", stats.get("first_error_position", {})),
        ("PRM/verifier disagreements", stats.get("disagree", {})),
        ("missing parts", len(result.missing)),
    ])
