"""Bad inputs across the stages (issue 8, item 4): each case asserts the exact error (or a stable
substring naming the file / row / field) or the row status, AND that nothing else was lost.

Cases: the shard store (truncated / corrupted Parquet, sha256 mismatch, newer schema, unsafe
paths, non-UTF-8 manifests, unfinished tables), schemas (missing columns, wrong types, nulls),
problem ingest (duplicates, empty text, non-UTF-8, wrong field types), grading (a LaTeX answer
that hangs sympy, a 1 MB response), scoring (NaN PRM scores, a 1 MB response), correction
(teacher HTTP 500s and timeouts), generation (prompt longer than the context), engine specs
and implicit remote code.
"""

from __future__ import annotations

import http.server
import json
import math
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope_data.folder import Folder
from scope_data.hashing import derive_seed, stable_id
from scope_data.layout import MANIFEST
from scope_data.schema import SCHEMAS, SchemaError, conform, validate
from scope_data.shards import (
    ShardError,
    TableStore,
    read_arrow,
    read_manifest,
    scan,
)
from scope_data.steps import split_steps
from scope_data.tasks import arith
from tests.helpers_tables import manifest_body, write_manifest_body, write_manifest_payload

# --------------------------------------------------------------------------- helpers


def problems_rows(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for i, p in enumerate(arith.generate_problems(n, seed=seed, steps=(3, 4), modulus=10)):
        rows.append({"problem_id": stable_id("arith", i, p.prompt), "source": "arith",
                     "source_index": i, "task": "arith", "prompt": p.prompt,
                     "answer": p.answer, "solution": p.solution})
    return rows


def write_problems(url: str, n: int = 6, parts: int = 1) -> pa.Table:
    """An arith problems table of `n` rows split over `parts` parts."""
    table = pa.Table.from_pylist(problems_rows(n), schema=SCHEMAS["problems"])
    store = TableStore(url, "problems")
    size = math.ceil(n / parts)
    for k in range(parts):
        store.write_part(table.slice(k * size, size), k, parts, {"n": n})
    store.finalize(parts, {"n": n})
    return table


def edit_manifest(url: str, **changes) -> None:
    body = manifest_body(url)
    for key, value in changes.items():
        if callable(value):
            value(body)
        else:
            body[key] = value
    write_manifest_body(url, body)


def part_path(url: str, k: int = 0) -> Path:
    return Path(url) / read_manifest(url).files[k]["path"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from pipelines.tiny.tokenizer import save_char_tokenizer

    out = tmp_path_factory.mktemp("char_tok")
    save_char_tokenizer(out, model_max_length=256)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2 with a 128-token context (generation cases)."""
    from tests.helpers_engines import build_random_tiny

    return build_random_tiny(tmp_path_factory.mktemp("tiny_random"), max_len=128)


def corrupt(problem: arith.ArithProblem, j: int) -> str:
    """A solution whose step j is wrong (later steps follow it)."""
    value, lines = problem.values[0], []
    for i, (op, b) in enumerate(problem.ops):
        result = arith.apply_op(value, op, b, problem.modulus)
        result = (result + 1) % problem.modulus if i == j else result
        lines.append(arith.step_line(value, op, b, result))
        value = result
    return "\n".join([*lines, f"Answer: {value}"])


def rollout_row(tok, policy: str, prob: dict, s: int, text: str, task: str | None = None) -> dict:
    """One rollouts row for `text` (tokenised with the char tokenizer + EOS)."""
    from pipelines.engines.prompts import render_and_encode

    (prompt_text,), (prompt_ids,) = render_and_encode(tok, [prob["prompt"]])
    ids = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    problem = arith.parse_prompt(prob["prompt"]) if prob["task"] == "arith" else None
    correct = bool(problem and arith.is_correct(problem, text))
    return {**prob, "task": task or prob["task"],
            "rollout_id": stable_id(prob["problem_id"], 0, s), "round": 0, "sample_idx": s,
            "policy": policy, "prompt_text": prompt_text, "prompt_token_ids": prompt_ids,
            "response_text": text, "response_token_ids": ids,
            "behaviour_logprobs": [-0.5] * len(ids), "finish_reason": "stop",
            "temperature": 1.0, "top_p": 1.0, "seed": s, "pred_answer": None,
            "reward": float(correct), "correct": correct, "status": "ok"}


def write_rollouts(url: str, rows: list[dict]) -> None:
    TableStore(url, "rollouts").write(pa.Table.from_pylist(rows, schema=SCHEMAS["rollouts"]),
                                      {"test": url})


def arith_rollouts(tok, tok_dir: Path, n: int = 4) -> list[dict]:
    """Per problem: the right solution and one wrong at step 1 (first_error 1 under rule:arith)."""
    rows = []
    for prob in problems_rows(n, seed=3):
        p = arith.parse_prompt(prob["prompt"])
        rows += [rollout_row(tok, f"hf:{tok_dir}", prob, 0, p.solution),
                 rollout_row(tok, f"hf:{tok_dir}", prob, 1, corrupt(p, 1))]
    return rows


def score(rollouts: str, out: str, prm=None, **kw):
    from pipelines.stages.score import ScoreConfig, run

    return run(ScoreConfig(rollouts=rollouts, out=out, **kw), prm=prm, quiet=True)


# --------------------------------------------------------------------------- shard store


def test_truncated_part_is_refused_by_checksum_and_the_other_parts_survive(tmp_path):
    url = str(tmp_path / "t")
    table = write_problems(url, 6, parts=2)
    path = part_path(url, 0)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardError, match=r"part-00000-of-00002\.parquet: sha256 does not match "
                                         r"the manifest \(file changed or corrupted"):
        read_arrow(url)
    with pytest.raises(ShardError, match="part-00000-of-00002.parquet: sha256 does not match"):
        scan(url)
    # the other part is intact and still checks out
    other = read_manifest(url).files[1]
    assert Folder(url).sha256(other["path"]) == other["sha256"]
    path.write_bytes(good)  # restoring the bytes restores the whole table
    assert read_arrow(url).equals(table)


def test_corrupted_parquet_with_matching_checksum_is_named_unreadable(tmp_path):
    url = str(tmp_path / "t")
    write_problems(url, 4)
    path = part_path(url)
    data = bytearray(path.read_bytes())
    data[-12:-8] = b"\xff\xff\xff\x7f"  # footer length: garbage
    path.write_bytes(bytes(data))
    edit_manifest(url, files=lambda b: b["files"][0].update(sha256=Folder(url).sha256(path.name)))
    with pytest.raises(ShardError, match=r"t/part-00000-of-00001.parquet: unreadable Parquet part"):
        read_arrow(url)


def test_replaced_part_is_a_sha256_mismatch(tmp_path):
    url, other = str(tmp_path / "t"), str(tmp_path / "other")
    write_problems(url, 4)
    write_problems(other, 5)
    part_path(url).write_bytes(part_path(other).read_bytes())  # valid Parquet, wrong content
    with pytest.raises(ShardError, match="part-00000-of-00001.parquet: sha256 does not match"):
        read_arrow(url)
    assert read_arrow(url, check=False).num_rows == 5  # what a reader without checks would eat


def test_listed_part_missing(tmp_path):
    url = str(tmp_path / "t")
    write_problems(url, 4)
    part_path(url).unlink()
    with pytest.raises(ShardError, match="part-00000-of-00001.parquet: listed in the manifest "
                                         "but missing"):
        read_arrow(url)


def test_manifest_from_a_newer_schema_is_refused(tmp_path):
    url = str(tmp_path / "t")
    write_problems(url, 3)
    edit_manifest(url, schema_version=99)
    with pytest.raises(ShardError, match=r"manifest.parquet: schema_version 99 is newer than this "
                                         r"code supports \(1\); upgrade scope to read it"):
        read_manifest(url)


@pytest.mark.parametrize("bad", ["../outside.parquet", "/etc/passwd", "sub/part.parquet",
                                 "s3://other-bucket/part.parquet", "~/part.parquet", ""])
def test_path_traversal_in_manifest_file_list_is_refused(tmp_path, bad):
    url = str(tmp_path / "t")
    write_problems(url, 3)
    edit_manifest(url, files=lambda b: b["files"].append({"path": bad, "rows": 1,
                                                          "sha256": "0" * 64}))
    with pytest.raises(ShardError, match=f"unsafe file path {bad!r} in the file list "
                                         "\\(refused\\)"):
        read_arrow(url)


@pytest.mark.parametrize("content, message", [
    (b'{"table": "problems", "files": [], "x": "\xff\xfe"}', "not valid UTF-8 JSON"),
    (b'{"table": "problems", "files": [', "not valid UTF-8 JSON"),
    (b'["a", "list"]', "not a table manifest"),
    (b'{"table": "problems", "files": [], "schema_version": "1"}',
     "schema_version '1' is not an integer"),
])
def test_unreadable_manifest_names_the_file(tmp_path, content, message):
    url = str(tmp_path / "t")
    write_problems(url, 3)
    write_manifest_payload(url, content)
    with pytest.raises(ShardError, match=f"t/{MANIFEST}: {message}"):
        read_manifest(url)


def test_unfinished_table_names_the_missing_part(tmp_path):
    url = str(tmp_path / "t")
    table = pa.Table.from_pylist(problems_rows(6), schema=SCHEMAS["problems"])
    store = TableStore(url, "problems")
    store.write_part(table.slice(0, 3), 0, 3, {"n": 6})
    store.write_part(table.slice(3, 3), 2, 3, {"n": 6})
    with pytest.raises(ShardError, match=r"no manifest \(\.scope/manifest\.parquet\); the stage "
                                         r"that writes this table has not finished \(2 of 3 "
                                         r"parts done; missing: part-00001-of-00003.parquet\)"):
        read_arrow(url)


# --------------------------------------------------------------------------- schemas


def test_missing_column_is_named_on_write_and_nothing_is_written(tmp_path):
    url = str(tmp_path / "t")
    table = pa.Table.from_pylist(problems_rows(3), schema=SCHEMAS["problems"]).drop_columns(
        ["answer"])
    with pytest.raises(SchemaError, match=r"problems in .*part-00000-of-00001.parquet: missing "
                                          r"column 'answer' \(string\)"):
        TableStore(url, "problems").write(table, {})
    assert not (Path(url) / MANIFEST).exists()
    assert not list(Path(url).rglob("*.done.parquet"))  # no marker either


@pytest.mark.parametrize("column, values, message", [
    ("source_index", ["zero", "one", "two"],
     r"cannot cast column 'source_index' \(string\) to int64"),
    ("prompt", [None, "x", "y"], "column 'prompt' has 1 null values but may not be null"),
])
def test_wrong_type_or_null_is_refused(tmp_path, column, values, message):
    rows = problems_rows(3)
    for row, v in zip(rows, values, strict=True):
        row[column] = v
    table = pa.Table.from_pylist(rows)
    with pytest.raises(SchemaError, match=message):
        validate("problems", conform("problems", table))


def test_stage_input_missing_a_column_names_table_and_column(tmp_path, model_dir):
    """A hand-made problems table (no `answer`) is refused before any model loads."""
    from pipelines.stages.generate import GenerateConfig, run

    url = str(tmp_path / "p")
    write_problems(url, 3)
    path = part_path(url)
    pq.write_table(pq.read_table(path).drop_columns(["answer"]), path)
    edit_manifest(url, files=lambda b: b["files"][0].update(sha256=Folder(url).sha256(path.name)))
    out = tmp_path / "r"
    with pytest.raises(SchemaError, match=f"problems table {url}: missing column 'answer'"):
        run(GenerateConfig(problems=url, policy=f"hf:{model_dir}", out=str(out), n=1,
                           max_new_tokens=4), quiet=True)
    assert not out.exists() or not list(out.iterdir())


def test_stage_input_with_a_wrong_type_names_the_column(tmp_path, model_dir):
    from pipelines.stages.generate import GenerateConfig, run

    url = str(tmp_path / "p")
    write_problems(url, 3)
    path = part_path(url)
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("source_index"), "source_index",
                     pa.array(["a", "b", "c"]))
    pq.write_table(t, path)
    edit_manifest(url, files=lambda b: b["files"][0].update(sha256=Folder(url).sha256(path.name)))
    with pytest.raises(SchemaError, match=r"problems in .*/p \(rows of part 0\): cannot cast "
                                          r"column 'source_index'"):
        run(GenerateConfig(problems=url, policy=f"hf:{model_dir}", out=str(tmp_path / "r"),
                           n=1, max_new_tokens=4), quiet=True)
    assert not (tmp_path / "r" / MANIFEST).exists()


def test_stage_refuses_the_wrong_table_kind(tmp_path):
    url = str(tmp_path / "p")
    write_problems(url, 3)
    with pytest.raises(ValueError, match=f"--rollouts {url} holds a 'problems' table; scope "
                                         "score reads the rollouts table"):
        score(url, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_downstream_stage_refuses_an_unfinished_upstream_naming_the_part(tmp_path, tok, tok_dir):
    url = str(tmp_path / "r")
    rows = arith_rollouts(tok, tok_dir, 4)
    store = TableStore(url, "rollouts")
    store.write_part(pa.Table.from_pylist(rows[:4], schema=SCHEMAS["rollouts"]), 1, 2, {"x": 1})
    with pytest.raises(ShardError, match=r"has not finished \(1 of 2 parts done; missing: "
                                         r"part-00000-of-00002.parquet\)"):
        score(url, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- problems ingest


def _ingest(tmp_path: Path, name: str, data: bytes, **kw):
    from scope_data.problems import ingest

    src = tmp_path / name
    src.write_bytes(data)
    return ingest(str(src), str(tmp_path / "out"), **kw)


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize("data, message", [
    (_jsonl({"id": 4, "problem": "1+1?", "answer": "2"}, {"id": 4, "problem": "1+1?",
                                                        "answer": "2"}),
     r"duplicate problem_id \w+ \(same source, index and problem text\): .*bad.jsonl, line 1 "
     r"and .*bad.jsonl, line 2"),
    (_jsonl({"problem": "1+1?", "answer": "2"}, {"problem": "  ", "answer": "3"}),
     r"bad.jsonl, line 2: no problem text \(field 'problem'\)"),
    (_jsonl({"problem": "1+1?", "answer": "2"}) + b'{"problem": "caf\xe9", "answer": "1"}\n',
     r"bad.jsonl, line 2: not valid UTF-8 \(byte 0xe9"),
    (_jsonl({"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": ""}),
     r"bad.jsonl, line 2: no answer \(field 'answer'\)"),
    (_jsonl({"problem": "1+1?", "answer": "2"}, {"problem": ["a", "list"], "answer": "4"}),
     r"bad.jsonl, line 2: field 'problem' holds a list, not text"),
    (_jsonl({"problem": "1+1?", "answer": "2"}) + b'{"problem": "2+2?", "answer": \n',
     r"bad.jsonl, line 2: not valid JSON"),
])
def test_bad_problem_records_are_named_and_nothing_is_written(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        _ingest(tmp_path, "bad.jsonl", data, index_field="id" if b'"id"' in data else None)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_skip_invalid_keeps_every_valid_row_and_counts_the_rest(tmp_path):
    data = _jsonl({"problem": "1+1?", "answer": "2"}, {"problem": "", "answer": "3"},
                  {"problem": "2+2?", "answer": "4"})
    result = _ingest(tmp_path, "some.jsonl", data, skip_invalid=True)
    assert result.rows == 2 and result.skipped == 1
    assert read_manifest(str(tmp_path / "out")).stats["status"] == {"ok": 2, "skipped_invalid": 1}
    assert read_arrow(str(tmp_path / "out"))["answer"].to_pylist() == ["2", "4"]


# --------------------------------------------------------------------------- grading


def test_latex_that_hangs_the_grader_times_out_and_the_next_grade_works():
    from scope_data.grading import grade

    t0 = time.perf_counter()
    hung = grade(r"so \boxed{9^{9^{9^{9}}}}", "7", timeout=1)
    assert (hung.pred_answer, hung.correct, hung.status) == ("9^{9^{9^{9}}}", False,
                                                            "grader_timeout")
    assert time.perf_counter() - t0 < 10
    ok = grade(r"so \boxed{\frac{1}{2}}", "0.5", timeout=5)
    assert (ok.correct, ok.status) == (True, "ok")


def test_one_megabyte_response_is_graded_and_split():
    from scope_data.grading import grade, grade_response

    big = ("We add the numbers carefully. " * 40 + "\n\n") * 850 + r"The answer is \boxed{42}."
    assert len(big) > 1_000_000
    g = grade(big, "42", timeout=5)
    assert (g.pred_answer, g.correct, g.status) == ("42", True, "ok")
    steps = split_steps(big, "blank_line")
    assert len(steps) == 851 and steps[-1].text.endswith(r"\boxed{42}.")
    assert big[steps[10].char_start:steps[10].char_end] == steps[10].text
    prob = problems_rows(1)[0]
    pred, correct, status = grade_response("arith", prob["prompt"], prob["answer"], big)
    assert (correct, status) == (False, "ok")


# --------------------------------------------------------------------------- scoring


def test_one_megabyte_response_is_scored_with_a_status(tmp_path, tok, tok_dir):
    rows = arith_rollouts(tok, tok_dir, 3)
    prob = {k: rows[0][k] for k in SCHEMAS["problems"].names}
    big = ("1 + 2 = 3 " * 10 + "\n") * 10_050  # 1 MB, 10,050 steps
    rows.append(rollout_row(tok, f"hf:{tok_dir}", prob, 7, big))
    write_rollouts(str(tmp_path / "r"), rows)
    result = score(str(tmp_path / "r"), str(tmp_path / "s"))
    out = read_arrow(str(tmp_path / "s")).to_pylist()
    assert result.manifest.rows == len(rows) == len(out)
    row = next(r for r in out if r["sample_idx"] == 7)
    assert len(big) > 1_000_000
    assert row["score_status"] == "ok" and len(row["steps"]) == 10_050
    last = row["steps"][-1]  # char tokenizer: token offsets equal char offsets, to the end
    assert (last["token_start"], last["token_end"]) == (last["char_start"], last["char_end"])
    assert last["char_end"] >= len(big) - 2
    expected = arith.first_error(arith.parse_prompt(prob["prompt"]), big)
    assert row["first_error"] == expected
    others = [r for r in out if r["sample_idx"] != 7]
    assert {r["score_status"] for r in others} == {"ok", "skipped"}


class NanPRM:
    """A PRM that returns NaN for steps containing NAN, 0.1 for BAD, 0.9 otherwise."""

    max_length = 1 << 20

    def __init__(self):
        from pipelines.engines.spec import EngineSpec

        self.spec = EngineSpec("hf-cls", "nan-test")

    def score_batch(self, items):
        return [[math.nan if "NAN" in s else 0.1 if "BAD" in s else 0.9 for s in steps]
                for _, steps in items]


@pytest.mark.parametrize("steps, status, first_error", [
    (["A good step.", "A NAN step.", "A BAD step."], "nan", None),  # the NaN hides step 1
    (["A good step.", "A BAD step.", "A NAN step."], "nan", 1),  # the error precedes the NaN
    (["A NAN step.", "A NAN step."], "nan", None),  # never a first error at a NaN step
    (["A good step.", "A good step."], "ok", 2),  # no low step, no answer: step 2 is missing
])
def test_nan_prm_scores_are_never_a_first_error(tmp_path, tok, tok_dir, steps, status,
                                                first_error):
    prob = {**problems_rows(1)[0], "task": "math", "answer": "5"}
    rows = [rollout_row(tok, f"hf:{tok_dir}", prob, 0, "\n\n".join(steps)),
            rollout_row(tok, f"hf:{tok_dir}", prob, 1, "It is fine.\n\nIt is BAD.\n\nIt is ok.")]
    write_rollouts(str(tmp_path / "r"), rows)
    result = score(str(tmp_path / "r"), str(tmp_path / "s"), prm=NanPRM())
    out = sorted(read_arrow(str(tmp_path / "s")).to_pylist(), key=lambda r: r["sample_idx"])
    assert [(r["score_status"], r["first_error"]) for r in out] == [(status, first_error),
                                                                    ("ok", 1)]
    assert [s["score"] is None for s in out[0]["steps"]] == ["NAN" in s for s in steps]
    assert result.manifest.stats["status"] == ({"ok": 2} if status == "ok" else
                                               {"nan": 1, "ok": 1})


# --------------------------------------------------------------------------- correction


class _Teacher(http.server.BaseHTTPRequestHandler):
    """A completions endpoint: for odd seeds, HTTP 500 (mode "500") or a stall (mode
    "timeout"); in mode "flaky" every seed's first request gets a 500. Otherwise the text
    "Answer: 0"."""

    mode = "500"
    seen: set = set()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        first = body["seed"] not in self.seen
        self.seen.add(body["seed"])
        if (self.mode == "flaky" and first) or (self.mode != "flaky" and body["seed"] % 2):
            if self.mode == "timeout":
                time.sleep(1.5)
            else:
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"internal error")
                return
        reply = json.dumps({"choices": [{"index": 0, "text": "Answer: 0",
                                         "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["500", "timeout", "flaky"])
def test_teacher_errors_keep_every_row_with_a_status(tmp_path, tok, tok_dir, mode):
    """Failed teacher calls give `teacher_error` rows (one request per batch here: a batch whose
    every row fails stops the stage, tests/hostile/test_remote_engines.py); a 500 that a retry
    cures gives every row its verdict."""
    from pipelines.stages.correct import CorrectConfig, run

    rows = arith_rollouts(tok, tok_dir, 6)
    write_rollouts(str(tmp_path / "r"), rows)
    score(str(tmp_path / "r"), str(tmp_path / "s"))
    handler = type("Handler", (_Teacher,), {"mode": mode, "seen": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = CorrectConfig(
            scored=str(tmp_path / "s"), out=str(tmp_path / "c"),
            teacher=f"openai:http://127.0.0.1:{server.server_port}/v1#tiny",
            template="raw", seed=5, require_correct=False, batch_size=1,
            engine_options={"tokenizer": str(tok_dir), "max_retries": 1, "backoff": 0.01,
                            "timeout": 0.5, "max_concurrency": 4},
        )
        result = run(cfg)
    finally:
        server.shutdown()
    out = read_arrow(str(tmp_path / "c")).to_pylist()
    policy = {r["rollout_id"]: r for r in out if r["kind"] == "policy"}
    assert sorted(policy) == sorted(r["rollout_id"] for r in rows)  # no row lost
    failed = [r["rollout_id"] for r in rows if not r["correct"]]
    odd = {rid for rid in failed if derive_seed(5, rid, 0) % 2 and mode != "flaky"}
    assert len(failed) == 6 and (odd or mode == "flaky") and odd != set(failed)
    status = {rid: policy[rid]["correct_status"] for rid in failed}
    for rid in failed:
        allowed = {"teacher_error"} if rid in odd else {"teacher_error", "rejected_wrong"}
        assert status[rid] in allowed
    answered = {rid for rid in failed if status[rid] == "rejected_wrong"}
    if mode == "flaky":  # the retry cured every 500
        assert answered == set(failed)
    corrected = [r for r in out if r["kind"] == "corrected"]
    assert sorted(r["source_rollout_id"] for r in corrected) == sorted(answered)
    assert all(r["response_text"].endswith("Answer: 0") for r in corrected)
    counts = result.manifest.stats["correct_status"]
    assert counts.get("teacher_error", 0) == len(failed) - len(answered)
    assert counts["not_failed"] == len(rows) - len(failed)


# --------------------------------------------------------------------------- generation


def test_prompt_longer_than_the_context_is_kept_with_a_status(tmp_path, model_dir):
    from pipelines.stages.generate import GenerateConfig, run

    url = str(tmp_path / "p")
    rows = problems_rows(3)
    long_prompt = "Mod 10. Start with 1." + " Add 3." * 30
    rows.append({**rows[0], "problem_id": "long", "source_index": 3, "prompt": long_prompt})
    TableStore(url, "problems").write(pa.Table.from_pylist(rows, schema=SCHEMAS["problems"]), {})
    result = run(GenerateConfig(problems=url, policy=f"hf:{model_dir}", out=str(tmp_path / "r"),
                                n=2, max_new_tokens=6, temperature=1.0), quiet=True)
    out = pl.from_arrow(read_arrow(str(tmp_path / "r")))
    assert out.height == 8  # 4 problems x n=2, nothing dropped
    long = out.filter(pl.col("problem_id") == "long")
    assert long["status"].to_list() == ["prompt_too_long"] * 2
    assert long["finish_reason"].to_list() == ["not_sent"] * 2
    assert long["response_token_ids"].to_list() == [[], []]
    rest = out.filter(pl.col("problem_id") != "long")
    assert "prompt_too_long" not in rest["status"].to_list()
    assert all(len(ids) > 0 for ids in rest["response_token_ids"].to_list())
    assert result.manifest.stats["status"]["prompt_too_long"] == 2


# --------------------------------------------------------------------------- engines


@pytest.mark.parametrize("spec, role, forms", [
    ("gpt4", "generation", "hf:<path-or-hub-id>, vllm:<path-or-hub-id>, openai:<base_url>#<model>"),
    ("hf-cls", "prm", "rule:arith, hf-cls:<model>, hf-tag:<model>, vllm:<model>"),
    ("tgi:http://x", "teacher", "oracle:arith, reference"),
])
def test_unknown_engine_spec_lists_the_valid_forms(spec, role, forms):
    from pipelines.engines.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=f"unknown {role} engine spec {spec!r}; valid forms: "
                                        f".*{forms}"):
        parse_spec(spec, role)


def test_unknown_engine_spec_stops_a_stage_before_it_writes(tmp_path):
    from pipelines.engines.spec import SpecError
    from pipelines.stages.generate import GenerateConfig, run

    url = str(tmp_path / "p")
    write_problems(url, 2)
    with pytest.raises(SpecError, match="unknown generation engine spec 'llama'; valid forms"):
        run(GenerateConfig(problems=url, policy="llama", out=str(tmp_path / "r")), quiet=True)
    assert not (tmp_path / "r").exists()


def test_model_folder_asking_for_remote_code_is_refused_without_the_flag(tmp_path, model_dir):
    import shutil

    from pipelines.engines.base import load_generation_engine

    folder = tmp_path / "evil"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match=r"evil/config.json asks for custom code \(auto_map: "
                                         r"modeling_evil.EvilForCausalLM\); scope does not run "
                                         r"code shipped with a model unless you pass "
                                         r"--trust-remote-code"):
        load_generation_engine(f"hf:{folder}")
    assert not marker.exists()
