"""`scope correct`: selection, teachers, splicing and the corrected table."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines.engines.prompts import render_and_encode
from pipelines.stages.correct import CorrectConfig, run
from pipelines.tiny.tokenizer import save_char_tokenizer
from scope_data.correction import CorrectionError
from scope_data.hashing import stable_id
from scope_data.schema import SCHEMAS
from scope_data.shards import TableStore, is_table, read_arrow, read_manifest
from scope_data.steps import char_to_token_spans, split_steps
from scope_data.tasks import arith


def corrupt(problem: arith.ArithProblem, j: int) -> str:
    """A solution whose step j states a wrong result (later steps follow it consistently)."""
    vals = list(problem.values)
    lines, value = [], vals[0]
    for i, (op, b) in enumerate(problem.ops):
        result = arith.apply_op(value, op, b, problem.modulus)
        if i == j:
            result = (result + 1) % problem.modulus
        lines.append(arith.step_line(value, op, b, result))
        value = result
    return "\n".join([*lines, f"Answer: {value}"])


def scored_row(tok, policy: str, pid: str, i: int, problem: arith.ArithProblem, s: int,
               text: str, k_override: int | None = None, solution: bool = True) -> dict:
    """One scored rollout as `scope score` with the rule PRM makes it (char tokenizer)."""
    (prompt_text,), (prompt_ids,) = render_and_encode(tok, [problem.prompt])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [*enc["input_ids"], tok.eos_token_id]
    steps = split_steps(text, "newline")
    spans = char_to_token_spans(steps, [*enc["offset_mapping"], (0, 0)])
    verdicts = arith.check_steps(problem, text)
    k = next((n for n, ok in enumerate(verdicts) if not ok), -1)
    correct = arith.is_correct(problem, text)
    return {
        "problem_id": pid, "source": "arith", "source_index": i, "task": "arith",
        "prompt": problem.prompt, "answer": problem.answer,
        "solution": problem.solution if solution else None,
        "rollout_id": stable_id(pid, 0, s), "round": 0, "sample_idx": s, "policy": policy,
        "prompt_text": prompt_text, "prompt_token_ids": prompt_ids, "response_text": text,
        "response_token_ids": ids, "behaviour_logprobs": [-0.5] * len(ids),
        "finish_reason": "stop", "temperature": 1.0, "top_p": 1.0, "seed": s,
        "pred_answer": arith.extract_answer(text), "reward": float(correct), "correct": correct,
        "status": "ok",
        "steps": [{"text": st.text, "char_start": st.char_start, "char_end": st.char_end,
                   "token_start": a, "token_end": b, "score": float(ok)}
                  for st, (a, b), ok in zip(steps, spans, verdicts, strict=True)],
        "first_error": k if k_override is None else k_override, "prm": "rule:arith",
        "threshold": 0.5, "score_status": "ok",
    }


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy_tok")
    save_char_tokenizer(out, model_max_length=256)
    return out


def build_scored(url: str, policy_dir: Path, n: int = 6) -> list[dict]:
    """Per problem: [correct, error at step 1, error at step 0, error at the last op]; every
    third problem has all four responses wrong; problem 1 has no reference solution."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    policy = f"hf:{policy_dir}"
    rows = []
    for i, p in enumerate(arith.generate_problems(n, seed=7, steps=(3, 5))):
        pid = stable_id("arith", i, p.prompt)
        last = len(p.ops) - 1
        texts = [p.solution, corrupt(p, 1), corrupt(p, 0), corrupt(p, last)]
        if i % 3 == 0:
            texts[0] = corrupt(p, 2)
        rows += [scored_row(tok, policy, pid, i, p, s, t, solution=i != 1)
                 for s, t in enumerate(texts)]
    table = pa.Table.from_pylist(rows, schema=SCHEMAS["scored"])
    TableStore(url, "scored").write(table, {"test": "scored", "n": n})
    return rows


@pytest.fixture()
def scored(tmp_path: Path, policy_dir: Path) -> tuple[str, list[dict]]:
    url = str(tmp_path / "scored")
    return url, build_scored(url, policy_dir)


def read(url: str) -> pl.DataFrame:
    return pl.from_arrow(read_arrow(url))


def test_oracle_scope(scored: tuple[str, list[dict]], tmp_path: Path,
                      capsys: pytest.CaptureFixture) -> None:
    url, rows = scored
    result = run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher="oracle:arith",
                               max_corrections_per_group=2))
    df = read(str(tmp_path / "c"))
    policy = df.filter(pl.col("kind") == "policy")
    corrected = df.filter(pl.col("kind") == "corrected")
    assert policy["rollout_id"].to_list() == [r["rollout_id"] for r in rows]  # every row kept
    # per problem: the latest first errors (last op, and step 2 or 1) are corrected
    by_sample = dict(zip(policy["sample_idx"].to_list(), policy["correct_status"].to_list(),
                         strict=False))
    assert set(policy["correct_status"]) == {"not_failed", "no_prefix", "accepted",
                                             "over_group_limit"}
    assert by_sample[2] == "no_prefix"
    n_problems = len({r["problem_id"] for r in rows})
    assert corrected.height == 2 * n_problems
    assert corrected["correct_status"].unique().to_list() == ["accepted"]
    assert corrected["correct"].all() and (corrected["reward"] == 1.0).all()
    src = {r["rollout_id"]: r for r in rows}
    for c in corrected.iter_rows(named=True):
        s = src[c["source_rollout_id"]]
        k = c["prefix_steps"]
        assert k == s["first_error"] >= 1
        start = s["steps"][k]["token_start"]
        assert c["off_policy_start"] == start
        assert c["response_token_ids"][:start] == s["response_token_ids"][:start]
        assert c["response_token_ids"][-1] == 1  # the policy's EOS
        assert c["response_text"].startswith(s["response_text"][: s["steps"][k]["char_start"]])
        problem = arith.parse_prompt(c["prompt"])
        assert arith.first_error(problem, c["response_text"]) == -1
        assert c["behaviour_logprobs"][:start] == [-0.5] * start
        assert all(math.isnan(x) for x in c["behaviour_logprobs"][start:])
        assert c["teacher"] == "oracle:arith" and c["score_status"] == "prefix_only"
        assert c["rollout_id"] == stable_id(s["rollout_id"], "oracle:arith", 0)
        assert c["prompt_token_ids"] == s["prompt_token_ids"]
    stats = result.manifest.stats
    assert stats["attempted"] == stats["accepted"] == 2 * n_problems
    assert stats["groups_all_failed"] == 2 and stats["groups_rescued"] == 2
    out = capsys.readouterr().out
    assert "salvage rate" in out and "rescued groups" in out
    assert read_manifest(str(tmp_path / "c")).config["teacher"] == "oracle:arith"


def test_reference_teacher_and_no_reference(scored: tuple[str, list[dict]],
                                            tmp_path: Path) -> None:
    url, rows = scored
    run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher="reference"))
    df = read(str(tmp_path / "c"))
    pid1 = rows[4]["problem_id"]  # problem 1 has no solution
    policy = df.filter(pl.col("kind") == "policy")
    st = dict(zip(policy["rollout_id"], policy["correct_status"], strict=True))
    assert "no_reference" in {st[r["rollout_id"]] for r in rows if r["problem_id"] == pid1}
    corrected = df.filter(pl.col("kind") == "corrected")
    assert corrected.height == len({r["problem_id"] for r in rows}) - 1
    assert corrected["correct"].all()
    oracle_dir = str(tmp_path / "o")
    run(CorrectConfig(scored=url, out=oracle_dir, teacher="oracle:arith"))
    oracle = read(oracle_dir).filter(pl.col("kind") == "corrected")
    same = corrected.join(oracle, on="source_rollout_id")
    assert (same["response_token_ids"] == same["response_token_ids_right"]).all()


def test_reference_teacher_joins_steps() -> None:
    from pipelines.engines.teachers import ReferenceTeacher, TeacherItem

    solution = "First we add.\n\nThen we multiply.\n\nSo the answer is \\boxed{6}."
    row = {"task": "math", "solution": solution}
    teacher = ReferenceTeacher()
    outs = teacher.continue_batch([
        TeacherItem(row, "We start.", [], 1), TeacherItem(row, "We start.\n", [], 1),
        TeacherItem(row, "We start.\n\n", [], 1), TeacherItem(row, "", [], 0),
        TeacherItem(row, "x", [], 3), TeacherItem({"task": "math", "solution": None}, "", [], 0),
    ])
    assert [o.text for o in outs[:4]] == [
        "\n\nThen we multiply.\n\nSo the answer is \\boxed{6}.",
        "\nThen we multiply.\n\nSo the answer is \\boxed{6}.",
        "Then we multiply.\n\nSo the answer is \\boxed{6}.",
        solution,
    ]
    assert [o.status for o in outs[4:]] == ["no_reference", "no_reference"]


def test_luffy_mode(scored: tuple[str, list[dict]], tmp_path: Path) -> None:
    url, rows = scored
    run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher="oracle:arith", mode="luffy"))
    df = read(str(tmp_path / "c"))
    corrected = df.filter(pl.col("kind") == "corrected")
    assert corrected.height == len({r["problem_id"] for r in rows})
    assert (corrected["off_policy_start"] == 0).all() and (corrected["prefix_steps"] == 0).all()
    assert corrected["correct"].all()
    for c in corrected.iter_rows(named=True):
        assert c["response_text"] == arith.parse_prompt(c["prompt"]).solution
        assert all(math.isnan(x) for x in c["behaviour_logprobs"])
        assert c["steps"] == []
    # luffy picks the lowest failed sample_idx: sample 1 (or 0 in the all-failed problems)
    src = {r["rollout_id"]: r["sample_idx"] for r in rows}
    assert {src[s] for s in corrected["source_rollout_id"]} <= {0, 1}


def test_require_correct_and_out_of_range(tmp_path: Path, policy_dir: Path) -> None:
    """A PRM that puts k* after the real error: the oracle cannot continue (teacher_error);
    a wrong reference solution gives a wrong answer (rejected_wrong)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    p = arith.generate_problems(1, seed=11, steps=(4, 4))[0]
    pid = stable_id("arith", 0, p.prompt)
    policy = f"hf:{policy_dir}"
    rows = [scored_row(tok, policy, pid, 0, p, 0, corrupt(p, 0), k_override=2),
            scored_row(tok, policy, pid, 0, p, 1, corrupt(p, 1), k_override=9)]
    for r in rows:
        r["solution"] = corrupt(p, 3)
    url = str(tmp_path / "s")
    TableStore(url, "scored").write(pa.Table.from_pylist(rows, schema=SCHEMAS["scored"]), {})
    run(CorrectConfig(scored=url, out=str(tmp_path / "o"), teacher="oracle:arith"))
    df = read(str(tmp_path / "o"))
    assert df["correct_status"].to_list() == ["teacher_error", "first_error_out_of_range"]
    run(CorrectConfig(scored=url, out=str(tmp_path / "r"), teacher="reference"))
    assert read(str(tmp_path / "r"))["kind"].to_list() == ["policy", "policy"]
    assert read(str(tmp_path / "r"))["correct_status"][0] == "rejected_wrong"
    run(CorrectConfig(scored=url, out=str(tmp_path / "r2"), teacher="reference",
                      require_correct=False))
    df = read(str(tmp_path / "r2"))
    assert df["kind"].to_list() == ["policy", "corrected", "policy"]
    assert df["correct_status"].to_list()[:2] == ["rejected_wrong", "rejected_wrong"]
    assert df["correct"][1] is False and df["off_policy_start"][1] > 0


def test_truncation(scored: tuple[str, list[dict]], tmp_path: Path) -> None:
    url, _ = scored
    run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher="oracle:arith",
                      max_response_tokens=30, require_correct=False))
    corrected = read(str(tmp_path / "c")).filter(pl.col("kind") == "corrected")
    # the suffix is cut to fit 30 tokens; a kept prefix is never cut (even when longer)
    for c in corrected.iter_rows(named=True):
        assert len(c["response_token_ids"]) == max(30, c["off_policy_start"])
    assert set(corrected["finish_reason"]) == {"length"}
    assert set(corrected["correct_status"]) == {"rejected_wrong"}  # the answer line was cut


def test_bad_offsets_name_the_rollout(tmp_path: Path, policy_dir: Path) -> None:
    url = str(tmp_path / "s")
    rows = build_scored(str(tmp_path / "good"), policy_dir, n=2)
    rows[1] = {**rows[1], "response_token_ids": rows[1]["response_token_ids"][:5],
               "behaviour_logprobs": rows[1]["behaviour_logprobs"][:5]}
    TableStore(url, "scored").write(pa.Table.from_pylist(rows, schema=SCHEMAS["scored"]), {})
    with pytest.raises(CorrectionError, match=f"rollout {rows[1]['rollout_id']}"):
        run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher="oracle:arith"))
    assert not is_table(str(tmp_path / "c"))


def test_bad_options(scored: tuple[str, list[dict]], tmp_path: Path) -> None:
    url, _ = scored
    out = str(tmp_path / "c")
    with pytest.raises(ValueError, match="oracle:<task> exists for arith, countdown"):
        run(CorrectConfig(scored=url, out=out, teacher="oracle:gsm8k"))
    with pytest.raises(ValueError, match="valid forms"):
        run(CorrectConfig(scored=url, out=out, teacher="gpt4"))
    with pytest.raises(ValueError, match="--mode"):
        run(CorrectConfig(scored=url, out=out, teacher="reference", mode="grpo"))
    with pytest.raises(ValueError, match="--attempts"):
        run(CorrectConfig(scored=url, out=out, teacher="reference", attempts=0))
    problems = str(tmp_path / "p")
    TableStore(problems, "problems").write(SCHEMAS["problems"].empty_table(), {})
    with pytest.raises(ValueError, match="holds a 'problems' table"):
        run(CorrectConfig(scored=problems, out=out, teacher="reference"))


def test_sharded_run_matches_single(scored: tuple[str, list[dict]], tmp_path: Path) -> None:
    url, _ = scored
    run(CorrectConfig(scored=url, out=str(tmp_path / "one"), teacher="oracle:arith"))
    for k in (0, 1):
        run(CorrectConfig(scored=url, out=str(tmp_path / "two"), teacher="oracle:arith",
                          num_shards=2, shard_index=k))
    one, two = read(str(tmp_path / "one")), read(str(tmp_path / "two"))
    key = ["rollout_id"]
    assert one.sort(key).equals(two.sort(key))
    m1, m2 = read_manifest(str(tmp_path / "one")), read_manifest(str(tmp_path / "two"))
    assert m1.stats["accepted"] == m2.stats["accepted"]
    assert m1.stats["groups_rescued"] == m2.stats["groups_rescued"]


def test_cli(scored: tuple[str, list[dict]], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    url, _ = scored
    out = str(tmp_path / "c")
    res = CliRunner().invoke(app, ["correct", "--scored", url, "--out", out,
                                   "--teacher", "oracle:arith", "--max-corrections-per-group", "2"])
    assert res.exit_code == 0, res.output
    assert "salvage rate" in res.output
    assert read_manifest(out).config["max_corrections_per_group"] == 2
    res = CliRunner().invoke(app, ["correct", "--scored", str(tmp_path / "nope"), "--out", out,
                                   "--teacher", "oracle:arith"])
    assert res.exit_code == 1 and "error:" in res.output


# ------------------------------------------------------------------ model teachers (hf, openai)

class CompletionsServer:
    """A minimal OpenAI-compatible `/completions` server over the hf engine, in a thread.

    `mode`: "ok" (generate), "empty" (empty text), "slow" (sleep past the client timeout),
    "down" (HTTP 503)."""

    def __init__(self, model_dir: Path, mode: str = "ok") -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from pipelines.engines.base import GenerationRequest
        from pipelines.engines.hf import HFGenerationEngine
        from pipelines.engines.spec import parse_spec

        engine = HFGenerationEngine(parse_spec(f"hf:{model_dir}"), num_threads=1)
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.mode == "down":
                    self.send_error(503, "overloaded")
                    return
                if server.mode == "slow":
                    time.sleep(3.0)
                    return
                req = GenerationRequest(body["prompt"], body["n"], body["temperature"],
                                        body["top_p"], body["max_tokens"], body["seed"])
                with lock:
                    results = engine.generate([req])[0]
                choices = [{"index": i, "finish_reason": r.finish_reason,
                            "text": "" if server.mode == "empty" else r.text,
                            "token_ids": [] if server.mode == "empty" else r.token_ids,
                            "logprobs": {"token_logprobs": r.logprobs}}
                           for i, r in enumerate(results)]
                data = json.dumps({"choices": choices}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.mode, self.requests = mode, []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def model_rows(df: pl.DataFrame) -> list[tuple]:
    return sorted(df.select("rollout_id", "kind", "correct_status", "response_token_ids",
                            "off_policy_start").iter_rows())


@pytest.mark.slow
def test_model_teacher_hf_and_openai_agree(scored: tuple[str, list[dict]], tmp_path: Path,
                                           tiny_teacher: Path) -> None:
    url, rows = scored
    common = dict(scored=url, temperature=0.0, max_new_tokens=64, max_corrections_per_group=2,
                  require_correct=False)
    run(CorrectConfig(out=str(tmp_path / "hf"), teacher=f"hf:{tiny_teacher}", **common))
    server = CompletionsServer(tiny_teacher)
    try:
        run(CorrectConfig(out=str(tmp_path / "oa"), teacher=f"openai:{server.url}#{tiny_teacher}",
                          cache_dir=str(tmp_path / "cache"), **common))
    finally:
        server.close()
    hf, oa = read(str(tmp_path / "hf")), read(str(tmp_path / "oa"))
    # same selection, statuses and tokens (the teacher spec differs, hence the rollout ids)
    strip = [(k, s, ids, o) for _, k, s, ids, o in model_rows(hf)]
    assert sorted(strip) == sorted((k, s, ids, o) for _, k, s, ids, o in model_rows(oa))
    corrected = hf.filter(pl.col("kind") == "corrected")
    assert corrected.height == 2 * len({r["problem_id"] for r in rows})
    # same vocabulary: the exact policy prefix ids went to the server after the teacher prompt
    sent = {tuple(b["prompt"]) for b in server.requests}
    src = {r["rollout_id"]: r for r in rows}
    for c in oa.filter(pl.col("kind") == "corrected").iter_rows(named=True):
        s = src[c["source_rollout_id"]]
        assert tuple(s["prompt_token_ids"] + c["response_token_ids"][: c["off_policy_start"]]) \
            in sent
    # both engines verified the same corrections (how many depends on the tiny teacher build,
    # see test_tiny_teacher_is_clean_and_better)
    assert (corrected["correct_status"] == "accepted").sum() == (
        oa.filter(pl.col("kind") == "corrected")["correct_status"] == "accepted").sum()


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers_engines import build_random_tiny

    return build_random_tiny(tmp_path_factory.mktemp("random_teacher"))


@pytest.mark.slow
def test_openai_teacher_errors_are_row_statuses(scored: tuple[str, list[dict]], tmp_path: Path,
                                                random_teacher: Path) -> None:
    """An endpoint that returns empty text: row statuses. One that times out or stays down
    (503) on every call: the stage stops with one line and writes nothing (the failures are
    transient: a rerun retries, tests/hostile/test_remote_engines.py)."""
    from scope_data.shards import ShardError, read_manifest

    url, rows = scored
    tiny_teacher = random_teacher
    n = len({r["problem_id"] for r in rows})
    for mode, status in (("empty", "empty_response"), ("slow", "teacher_error"),
                         ("down", "teacher_error")):
        server = CompletionsServer(tiny_teacher, mode)
        cfg = CorrectConfig(scored=url, out=str(tmp_path / mode), max_new_tokens=8,
                            teacher=f"openai:{server.url}#{tiny_teacher}",
                            cache_dir=str(tmp_path / f"{mode}-cache"),  # no earlier replies
                            engine_options={"timeout": 1.0 if mode == "slow" else 60.0,
                                            "max_retries": 1, "backoff": 0.01})
        try:
            if status == "teacher_error":
                with pytest.raises(RuntimeError, match=f"failed on all {n} rollouts it was "
                                                       "asked to correct in part 0"):
                    run(cfg)
                with pytest.raises(ShardError, match="no manifest"):
                    read_manifest(str(tmp_path / mode))
                continue
            run(cfg)
        finally:
            server.close()
        df = read(str(tmp_path / mode))
        assert df.height == len(rows)  # every row kept, no corrected rows
        assert (df["correct_status"] == status).sum() == n, mode


@pytest.mark.slow
def test_teacher_with_another_tokenizer(scored: tuple[str, list[dict]], tmp_path: Path,
                                        policy_dir: Path) -> None:
    """A teacher whose BPE vocabulary differs from the policy's char vocabulary: the prefix is
    re-encoded for the teacher, the suffix ids are the POLICY encoding of the teacher's text."""
    from transformers import AutoTokenizer

    from pipelines.engines.base import load_generation_engine
    from pipelines.engines.teachers import EngineTeacher, TeacherItem

    teacher_dir = build_bpe_teacher(tmp_path / "bpe_teacher")
    url, rows = scored
    run(CorrectConfig(scored=url, out=str(tmp_path / "c"), teacher=f"hf:{teacher_dir}",
                      max_new_tokens=24, require_correct=False, seed=3))
    policy_tok = AutoTokenizer.from_pretrained(str(policy_dir))
    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    assert teacher_tok.get_vocab() != policy_tok.get_vocab()
    df = read(str(tmp_path / "c"))
    corrected = df.filter(pl.col("kind") == "corrected")
    assert corrected.height > 0
    src = {r["rollout_id"]: r for r in rows}
    for c in corrected.iter_rows(named=True):
        start = c["off_policy_start"]
        assert c["response_token_ids"][:start] == src[c["source_rollout_id"]][
            "response_token_ids"][:start]
        prefix_text = policy_tok.decode(c["response_token_ids"][:start])
        suffix_text = c["response_text"][len(prefix_text):]
        suffix_ids = c["response_token_ids"][start:]
        if c["finish_reason"] == "stop":
            assert suffix_ids[-1] == policy_tok.eos_token_id
            suffix_ids = suffix_ids[:-1]
        assert suffix_ids == policy_tok(suffix_text, add_special_tokens=False)["input_ids"]
    # the request carries the TEACHER encoding of the prefix text, not the policy ids
    engine = load_generation_engine(f"hf:{teacher_dir}")
    teacher = EngineTeacher(engine, policy_tok.get_vocab())
    assert not teacher.same_vocab
    text = "1 + 2 = 3\n"
    req = teacher.request_for(TeacherItem(rows[0], text, policy_tok.encode(text), 1))
    assert req.prefix_token_ids == teacher_tok(text, add_special_tokens=False)["input_ids"]
    assert len(req.prefix_token_ids) < len(text)  # BPE merges: fewer tokens than characters


def build_bpe_teacher(out: Path) -> Path:
    """A random-init tiny Qwen2 with a BPE tokenizer trained on arith solutions (merges, other
    ids than the char tokenizer), saved as a normal model folder with a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from pipelines.tiny.tokenizer import CHARS, CHAT_TEMPLATE, SPECIAL_TOKENS

    backend = Tokenizer(models.BPE(unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS[::-1]),
                                  initial_alphabet=list(CHARS[::-1]), show_progress=False)
    corpus = [p.solution for p in arith.generate_problems(400, seed=99)]
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>",
                                  eos_token="<|eos|>", unk_token="<|unk|>",
                                  chat_template=CHAT_TEMPLATE, model_max_length=256)
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------ end to end with the tiny policy

@pytest.mark.slow
def test_end_to_end_generate_score_correct(tmp_path: Path, tiny_policy: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    from pipelines.stages.generate import GenerateConfig
    from pipelines.stages.generate import run as generate
    from pipelines.stages.score import ScoreConfig
    from pipelines.stages.score import run as score
    from scope_data.problems import write_arith

    write_arith(str(tmp_path / "problems"), count=32, seed=5, steps=(3, 6))
    generate(GenerateConfig(problems=str(tmp_path / "problems"), policy=f"hf:{tiny_policy}",
                            out=str(tmp_path / "rollouts"), n=4, max_new_tokens=96, seed=1))
    score(ScoreConfig(rollouts=str(tmp_path / "rollouts"), out=str(tmp_path / "scored"),
                      prm="rule:arith"))
    capsys.readouterr()
    result = run(CorrectConfig(scored=str(tmp_path / "scored"), out=str(tmp_path / "corrected"),
                               teacher="oracle:arith"))
    printed = capsys.readouterr().out
    stats = result.manifest.stats
    acceptance = stats["accepted"] / stats["attempted"]
    with capsys.disabled():
        print(f"\n[e2e] rollouts={stats['rollouts']} failed={stats['failed']} "
              f"eligible={stats['eligible']} attempted={stats['attempted']} "
              f"accepted={stats['accepted']} accepted/attempted={acceptance:.3f} "
              f"kept_prefix_share={stats['prefix_share_sum'] / stats['accepted']:.3f} "
              f"all_failed_groups={stats['groups_all_failed']} "
              f"rescued={stats['groups_rescued']} statuses={stats['correct_status']}")
    assert "salvage rate" in printed and "rescued groups" in printed
    assert stats["attempted"] > 0 and acceptance > 0.9  # the rule PRM + oracle: exact prefixes
    assert stats["groups_rescued"] > 0
    df = read(str(tmp_path / "corrected"))
    scored = read(str(tmp_path / "scored"))
    assert df.filter(pl.col("kind") == "policy").height == scored.height
    corrected = df.filter(pl.col("kind") == "corrected")
    src = {r["rollout_id"]: r for r in scored.iter_rows(named=True)}
    for c in corrected.iter_rows(named=True):
        s = src[c["source_rollout_id"]]
        start = c["off_policy_start"]
        assert c["response_token_ids"][:start] == s["response_token_ids"][:start]
        assert c["behaviour_logprobs"][:start] == pytest.approx(s["behaviour_logprobs"][:start])
        assert arith.first_error(arith.parse_prompt(c["prompt"]), c["response_text"]) == -1


def test_attempts_retry_until_verified(scored: tuple[str, list[dict]], tmp_path: Path,
                                       random_teacher: Path) -> None:
    """A random-init teacher never verifies: every selected rollout uses all its attempts, and
    (require_correct off) the last attempt's correction is written."""
    url, rows = scored
    out = str(tmp_path / "c")
    result = run(CorrectConfig(scored=url, out=out, teacher=f"hf:{random_teacher}", attempts=3,
                               max_new_tokens=6, require_correct=False))
    stats = result.manifest.stats
    assert stats["teacher_calls"] == 3 * stats["attempted"] > 0
    corrected = read(out).filter(pl.col("kind") == "corrected")
    teacher = f"hf:{random_teacher}"
    for c in corrected.iter_rows(named=True):
        assert c["rollout_id"] == stable_id(c["source_rollout_id"], teacher, 2)
        assert c["correct_status"] == "rejected_wrong" and not c["correct"]


def test_token_merged_across_the_step_boundary_is_cut_not_fatal(tmp_path: Path) -> None:
    """A policy tokenizer with one token for "8\\n8" (the end of a step and the start of the
    next): the kept prefix stops before that token, the oracle finishes the cut step, and a row
    whose offsets cannot be spliced at all is kept with a status instead of stopping the stage."""
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "merging"
    save_char_tokenizer(tok_dir, model_max_length=256)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_tokens(["8\n8"])
    tok.save_pretrained(str(tok_dir))
    merged = tok.convert_tokens_to_ids("8\n8")
    # a problem whose step j result is 8 (so step j+1 starts with 8); the error is at step j+1
    p, j = next((p, j) for p in arith.generate_problems(200, seed=5, steps=(3, 5))
                for j in range(len(p.ops) - 1) if p.values[j + 1] == 8)
    pid = stable_id("arith", 0, p.prompt)
    good = scored_row(tok, f"hf:{tok_dir}", pid, 0, p, 0, corrupt(p, j + 1))
    assert good["first_error"] == j + 1 and merged in good["response_token_ids"]
    bad = scored_row(tok, f"hf:{tok_dir}", pid, 0, p, 1, corrupt(p, j + 1))
    for step in bad["steps"][j + 1 :]:  # offsets shifted: no cut can match the text
        step["token_start"] += 3
        step["token_end"] = max(step["token_end"], step["token_start"])
    url = str(tmp_path / "s")
    TableStore(url, "scored").write(pa.Table.from_pylist([good, bad], schema=SCHEMAS["scored"]),
                                    {})
    run(CorrectConfig(scored=url, out=str(tmp_path / "o"), teacher="oracle:arith",
                      max_corrections_per_group=2))
    df = read(str(tmp_path / "o"))
    assert df["kind"].to_list() == ["policy", "corrected", "policy"]
    assert df["correct_status"].to_list() == ["accepted", "accepted", "prefix_mismatch"]
    fixed = df.row(1, named=True)
    cut = good["response_token_ids"].index(merged)  # the merged token is not kept
    assert fixed["off_policy_start"] == cut
    assert fixed["response_token_ids"][:cut] == good["response_token_ids"][:cut]
    assert fixed["response_text"] == p.solution and fixed["correct"]
    stats = read_manifest(str(tmp_path / "o")).stats
    assert "prefix_mismatch_examples" in stats and bad["rollout_id"] in str(stats)


def test_unfinished_response_keeps_every_step(tmp_path: Path, policy_dir: Path) -> None:
    """All written steps right but no answer: k* = len(steps) keeps them all and the oracle
    writes the missing ones."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    p = arith.generate_problems(1, seed=13, steps=(4, 4))[0]
    text = "\n".join(p.solution_lines[:2])
    row = scored_row(tok, f"hf:{policy_dir}", stable_id("arith", 0, p.prompt), 0, p, 0, text,
                     k_override=2)
    url = str(tmp_path / "s")
    TableStore(url, "scored").write(pa.Table.from_pylist([row], schema=SCHEMAS["scored"]), {})
    run(CorrectConfig(scored=url, out=str(tmp_path / "o"), teacher="oracle:arith"))
    df = read(str(tmp_path / "o"))
    assert df["correct_status"].to_list() == ["accepted", "accepted"]
    fixed = df.row(1, named=True)
    assert fixed["prefix_steps"] == 2 and fixed["response_text"] == p.solution
    assert fixed["off_policy_start"] == row["steps"][-1]["token_end"]
