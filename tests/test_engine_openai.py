"""openai engine against a small in-test completions server backed by the hf engine."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.engines.base import GenerationRequest, load_generation_engine
from pipelines.engines.prompts import render_and_encode
from pipelines.stages.generate import GenerateConfig, run
from scope_data.shards import ShardError, read_arrow, read_manifest
from tests.helpers_engines import build_random_tiny, write_problems

PROMPTS = ["Mod 10. Start with 1. Add 3.", "Mod 10. Start with 5. Add 3. Multiply by 2."]


class CompletionsServer:
    """`POST /v1/completions` with token-id prompts, answered by an hf engine (vLLM's fields).

    `fail_next` requests get HTTP 503 first; `plain=True` omits token ids (a non-vLLM server);
    `tamper(reply)`, when set, edits each reply before it is sent (a hostile server).
    """

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name, self.lock = engine, model_name, threading.Lock()
        self.hits = 0
        self.fail_next = 0
        self.plain = False
        self.tamper = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, reply = outer.handle(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, path, body):
        with self.lock:
            self.hits += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503, {"error": "overloaded"}
            if path != "/v1/completions" or body["model"] != self.model_name:
                return 400, {"error": f"unknown model {body['model']}"}
            req = GenerationRequest(body["prompt"], n=body["n"], temperature=body["temperature"],
                                    top_p=body["top_p"], max_new_tokens=body["max_tokens"],
                                    seed=body["seed"])
            results = self.engine.generate([req])[0]
        choices = []
        for i, r in enumerate(results):
            c = {"index": i, "text": r.text, "finish_reason": r.finish_reason,
                 "logprobs": {"tokens": [f"token_id:{t}" for t in r.token_ids],
                              "token_logprobs": r.logprobs}}
            if self.plain:
                c["logprobs"]["tokens"] = [self.engine.tokenizer.decode([t]) for t in r.token_ids]
            else:
                c["token_ids"] = r.token_ids
            choices.append(c)
        reply = {"id": "cmpl-test", "object": "text_completion", "choices": choices}
        if self.tamper is not None:
            self.tamper(reply)
        return 200, reply

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = build_random_tiny(root / "model")
    hf = load_generation_engine(f"hf:{model}")
    server = CompletionsServer(hf, "tiny")
    yield root, model, hf, server
    server.close()
    hf.close()


def make_engine(server, model, cache_dir, **kw):
    opts = {"tokenizer": str(model), "cache_dir": str(cache_dir), "max_retries": 3,
            "backoff": 0.01, "max_concurrency": 4, **kw}
    return load_generation_engine(f"openai:{server.url}#tiny", **opts)


def requests_for(hf):
    ids = render_and_encode(hf.tokenizer, PROMPTS)[1]
    return [GenerationRequest(ids[0], n=2, temperature=1.0, max_new_tokens=20, seed=3),
            GenerationRequest(ids[1], n=1, temperature=0.7, max_new_tokens=20, seed=4)]


def test_retried_503_then_same_results_as_hf_and_cache(served, tmp_path):
    root, model, hf, server = served
    reqs = requests_for(hf)
    engine = make_engine(server, model, tmp_path / "cache")
    assert engine.max_model_len == 256  # from the tokenizer's model_max_length
    server.fail_next, before = 2, server.hits
    got = engine.generate(reqs)
    assert server.hits - before == 2 + len(reqs)  # two 503s retried, then one POST each
    want = hf.generate(reqs)
    for g_list, w_list in zip(got, want, strict=True):
        assert len(g_list) == len(w_list)
        for g, w in zip(g_list, w_list, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)) < 1e-5
    # a rerun with the same cache re-sends nothing
    again = make_engine(server, model, tmp_path / "cache")
    hits = server.hits
    assert [[r.token_ids for r in rs] for rs in again.generate(reqs)] == \
        [[r.token_ids for r in rs] for rs in got]
    assert server.hits == hits and again.sent == 0


def test_errors_name_the_url(served, tmp_path):
    root, model, hf, server = served
    req = requests_for(hf)[:1]
    server.fail_next = 10
    with pytest.raises(RuntimeError, match=r"failed after 4 attempts.*HTTP 503"):
        make_engine(server, model, tmp_path / "c1").generate(req)
    server.fail_next = 0
    hits = server.hits
    wrong = load_generation_engine(f"openai:{server.url}#other", tokenizer=str(model),
                                   max_retries=3, backoff=0.01)
    with pytest.raises(RuntimeError, match="HTTP 400"):  # client errors are not retried
        wrong.generate(req)
    assert server.hits == hits + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = load_generation_engine(f"openai:http://127.0.0.1:{port}/v1#tiny",
                                  tokenizer=str(model), max_retries=1, backoff=0.01)
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}/v1/completions failed"):
        down.generate(req)


def test_plain_server_response_is_retokenised(served, tmp_path):
    root, model, hf, server = served
    server.plain = True
    try:
        (r,) = make_engine(server, model, tmp_path / "c").generate(requests_for(hf)[1:])[0]
    finally:
        server.plain = False
    assert r.token_ids == hf.tokenizer(r.text, add_special_tokens=False)["input_ids"]
    # server log-probs are kept only when their count matches the re-tokenised ids
    nan = [math.isnan(x) for x in r.logprobs]
    assert len(nan) == len(r.token_ids) and (all(nan) or not any(nan))


def test_generate_stage_via_openai_and_down_endpoint(served, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "shared"))
    root, model, hf, server = served
    write_problems(str(tmp_path / "problems"), n=2)
    base = {"problems": str(tmp_path / "problems"), "n": 2, "max_new_tokens": 12, "seed": 1}
    run(GenerateConfig(policy=f"hf:{model}", out=str(tmp_path / "hf"), **base), quiet=True)
    res = run(GenerateConfig(policy=f"openai:{server.url}#tiny", out=str(tmp_path / "oa"),
                             tokenizer=str(model), **base), quiet=True)
    assert res.manifest.rows == 4
    # default cache: per output folder, outside the table (polars reads every file in it)
    assert len(list((tmp_path / "shared" / "requests").iterdir())) == 1
    assert sorted(p.suffix for p in (tmp_path / "oa").iterdir() if p.is_file()) == [".parquet"]
    a, b = read_arrow(str(tmp_path / "hf")), read_arrow(str(tmp_path / "oa"))
    assert a.column("response_token_ids").equals(b.column("response_token_ids"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="failed after"):
        run(GenerateConfig(policy=f"openai:http://127.0.0.1:{port}/v1#tiny",
                           out=str(tmp_path / "down"), tokenizer=str(model),
                           engine_kwargs={"max_retries": 1, "backoff": 0.01}, **base),
            quiet=True)
    with pytest.raises(ShardError):
        read_manifest(str(tmp_path / "down"))
    assert not list((tmp_path / "down").glob("part-*"))
