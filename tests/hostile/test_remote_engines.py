"""Issue 16, class 5: untrusted remote engines. A reply with token ids outside the vocabulary,
log-probs above 0 or huge, or no `index` is refused (never stored as `ok`, never cached); a dead
teacher stops `correct` with one line and nothing written; transient teacher failures stay
retryable: a rerun corrects them."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest
from typer.testing import CliRunner

from cli.main import app
from pipelines.engines.base import GenerationRequest
from pipelines.stages.correct import CorrectConfig
from pipelines.stages.correct import run as run_correct
from scope_data.hashing import derive_seed
from scope_data.layout import MANIFEST
from scope_data.shards import read_arrow, read_manifest
from tests.helpers_engines import write_problems
from tests.hostile.helpers import snapshot
from tests.test_bad_inputs import _Teacher, arith_rollouts, score, tok, tok_dir, write_rollouts
from tests.test_engine_openai import make_engine, served

__all__ = ["served", "tok", "tok_dir"]  # fixtures shared with the modules they come from


def _set(path: str, value):
    """A tamper function setting choices[0].<path> (dots for nesting) to `value`."""
    def tamper(reply):
        node = reply["choices"][0]
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        if value is KeyError:
            node.pop(last)
        else:
            node[last] = value(node[last]) if callable(value) else value
    return tamper




@pytest.mark.parametrize("tamper, reason", [
    (_set("token_ids", lambda ids: [-1, *ids[1:]]),
     r"choice 0: token id -1 is outside the policy vocabulary \[0, \d+\)"),
    (_set("token_ids", lambda ids: [*ids[:-1], 10**9]),
     r"choice 0: token id 1000000000 is outside the policy vocabulary"),
    (_set("logprobs.token_logprobs", lambda lp: [0.5, *lp[1:]]),
     "choice 0: log-prob 0.5 is not a number <= 0"),
    (_set("logprobs.token_logprobs", lambda lp: [*lp[:-1], 1e30]),
     "choice 0: log-prob 1e[+]30 is not a number <= 0"),
    (_set("index", KeyError), "choice 0 has no integer 'index' \\(got None\\)"),
    (_set("index", 1), r"choice indices \[1\] are not 0..0"),
    (_set("logprobs.tokens", lambda t: ["token_id:99999999"] * len(t)),
     "choice 0: 'token_id:99999999' is outside the policy vocabulary"),
])
def test_invalid_replies_are_refused_never_cached_and_retried(served, tmp_path, tamper, reason):
    root, model, hf, server = served
    ids = hf.tokenizer("Mod 10. Start with 1. Add 3.")["input_ids"]
    req = [GenerationRequest(ids, n=1, temperature=1.0, max_new_tokens=8, seed=7)]
    engine = make_engine(server, model, tmp_path / "cache")
    server.tamper = tamper
    try:
        with pytest.raises(RuntimeError, match=f"openai engine: {server.url}/completions "
                                               f"returned an invalid reply: {reason}"):
            engine.generate(req)
    finally:
        server.tamper = None
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    (good,) = engine.generate(req)[0]  # the same request, answered well, is used and cached
    assert good.token_ids and all(0 <= t < len(hf.tokenizer) for t in good.token_ids)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_generate_with_a_hostile_endpoint_exits_1_with_one_line_and_writes_nothing(
        served, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    root, model, hf, server = served
    write_problems(str(tmp_path / "problems"), n=2)
    before = snapshot(tmp_path / "out"), snapshot(tmp_path / "problems")  # out: new, no files
    args = ["generate", "--problems", str(tmp_path / "problems"), "--out", str(tmp_path / "out"),
            "--policy", f"openai:{server.url}#tiny", "--tokenizer", str(model), "--n", "2",
            "--max-new-tokens", "8"]
    server.tamper = _set("token_ids", lambda ids: [*ids[:-1], -5])
    try:
        result = CliRunner().invoke(app, args)
    finally:
        server.tamper = None
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "returned an invalid reply: choice 0: token id -5" in lines[0]
    assert "Traceback" not in result.output
    assert (snapshot(tmp_path / "out"), snapshot(tmp_path / "problems")) == before
    # the rerun (a healthy endpoint) writes the whole table: nothing invalid was cached
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_arrow(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 4 and all(-5 not in r["response_token_ids"] for r in rows)


class _Counting(_Teacher):
    hits = 0

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        super().do_POST()


def _serve(mode: str, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, type]:
    """A teacher endpoint (see `_Teacher`); its handler class can switch mode while serving."""
    handler = type("Handler", (_Counting,), {"mode": mode, "seen": set(), "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def _correct_cfg(tmp_path, tok_dir, port: int, retries: int = 0) -> CorrectConfig:
    """One teacher request per batch: a failed request never takes its neighbours with it."""
    return CorrectConfig(batch_size=1,
        scored=str(tmp_path / "s"), out=str(tmp_path / "c"),
        teacher=f"openai:http://127.0.0.1:{port}/v1#tiny", template="raw", seed=5,
        require_correct=False, cache_dir=str(tmp_path / "cache"),
        engine_options={"tokenizer": str(tok_dir), "max_retries": retries, "backoff": 0.01,
                        "timeout": 2.0, "max_concurrency": 4})


def test_dead_teacher_exits_1_with_one_line_and_nothing_written_then_a_rerun_corrects(
        tmp_path, tok, tok_dir):
    rows = arith_rollouts(tok, tok_dir, 4)
    write_rollouts(str(tmp_path / "r"), rows)
    score(str(tmp_path / "r"), str(tmp_path / "s"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: a dead teacher
    before = snapshot(tmp_path / "s")
    args = ["correct", "--scored", str(tmp_path / "s"), "--out", str(tmp_path / "c"),
            "--teacher", f"openai:http://127.0.0.1:{port}/v1#tiny", "--template", "raw",
            "--no-require-correct", "--cache-dir", str(tmp_path / "cache"),
            "--engine-options", json.dumps({"tokenizer": str(tok_dir), "max_retries": 0})]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"error: teacher openai:http://127.0.0.1:{port}/v1#tiny failed on all 4 rollouts " \
           "it was asked to correct in part 0" in text
    assert "nothing written for this part; rerun the same command to retry" in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.parquet"))
    assert snapshot(tmp_path / "s") == before
    # the rerun corrects every failed rollout
    server, _ = _serve("flaky", port)  # the teacher comes back at the same address
    try:
        run_correct(_correct_cfg(tmp_path, tok_dir, port, retries=1))
    finally:
        server.shutdown()
        server.server_close()
    counts = read_manifest(str(tmp_path / "c")).stats["correct_status"]
    assert counts == {"not_failed": 4, "rejected_wrong": 4}


def test_transient_teacher_errors_are_retried_by_a_rerun(tmp_path, tok, tok_dir):
    """Odd seeds get HTTP 500: those rows are `teacher_error`, the part says how many may pass,
    and a rerun against a healthy teacher corrects them."""
    rows = arith_rollouts(tok, tok_dir, 6)
    write_rollouts(str(tmp_path / "r"), rows)
    score(str(tmp_path / "r"), str(tmp_path / "s"))
    failed = [r["rollout_id"] for r in rows if not r["correct"]]
    odd = {rid for rid in failed if derive_seed(5, rid, 0) % 2}
    assert odd and odd != set(failed)
    server, handler = _serve("500")
    port = server.server_port
    try:
        first = run_correct(_correct_cfg(tmp_path, tok_dir, port))
        assert first.manifest.stats["retryable_rows"] == len(odd)
        assert first.manifest.stats["correct_status"]["teacher_error"] == len(odd)
        handler.mode, handler.hits = "flaky", 0  # the endpoint recovers
        again = run_correct(_correct_cfg(tmp_path, tok_dir, port))
        assert handler.hits == len(odd)  # the replies that succeeded come from the cache
        third = run_correct(_correct_cfg(tmp_path, tok_dir, port))
    finally:
        server.shutdown()
        server.server_close()
    assert again.parts_written == 1 and again.manifest is not None
    assert again.manifest.stats["correct_status"] == {"not_failed": 6, "rejected_wrong": 6}
    assert again.manifest.stats["retryable_rows"] == 0
    policy = {r["rollout_id"]: r for r in read_arrow(str(tmp_path / "c")).to_pylist()
              if r["kind"] == "policy"}
    assert sorted(policy) == sorted(r["rollout_id"] for r in rows)  # no row lost
    assert third.parts_skipped == 1 and handler.hits == len(odd)  # nothing left to retry
    assert (tmp_path / "c" / MANIFEST).is_file()
