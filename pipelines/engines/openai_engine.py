"""`openai:<base_url>#<model>`: an OpenAI-compatible completions endpoint (e.g. `vllm serve`).

Each request becomes one POST `{base_url}/completions` with the prompt as token ids:
`{"model", "prompt": [ids], "n", "seed", "temperature", "top_p", "max_tokens", "logprobs": 0,
"return_token_ids": true, "return_tokens_as_token_ids": true}` and `"top_k"` when top-k is on
(the last three are vLLM extensions; other servers ignore them). For n > 1 vLLM seeds child i
with seed + i, like our hf engine. Behaviour log-probs are the server's `token_logprobs`: start
vLLM with `--logprobs-mode processed_logprobs` so they are temperature/top-k/top-p processed
(its default, `raw_logprobs`, reports the untempered model distribution).

Response token ids, in order of preference: the choice's `token_ids` (vLLM
`return_token_ids`), the `token_id:<id>` strings of `logprobs.tokens`, else the response text
re-tokenised with the policy tokenizer (then log-probs are kept only if their count matches,
else they are NaN: such rows need the trainer to recompute old log-probs).

Requests run on a thread pool (`max_concurrency` in flight). HTTP 429/5xx, timeouts and refused
connections are retried with exponential backoff (`backoff * 2**k` seconds, `max_retries`
retries); after the last one a RuntimeError names the URL and the last status. Other 4xx fail at
once. The endpoint is not trusted: a reply is checked before it is used or cached (`n` choices
with distinct integer `index` 0..n-1, text a string, token ids integers in [0, vocabulary size),
log-probs numbers <= 1e-4 and not NaN/inf; null stays NaN); an invalid reply is a RuntimeError
naming the URL and the first bad value, never a row. Every valid response is stored in
`cache_dir` as `<sha256 of the payload>.json`, so a rerun re-sends nothing that already
succeeded.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipelines.engines.base import GenerationRequest, GenerationResult
from pipelines.engines.spec import EngineSpec, load_tokenizer, resolve
from scope_data.folder import write_local_atomic
from scope_data.hashing import canonical_json, sha256_hex

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
LOGPROB_SLACK = 1e-4  # a log-prob above this is not a probability's log (rounding aside)


def default_cache_dir(out: str) -> str:
    """Where the openai engine caches responses: `$SCOPE_CACHE/requests` (default
    `~/.cache/scope/requests`), in a subfolder per local output folder (a rerun of this stage
    re-sends nothing; other runs never see its replies), shared for object-store outputs. Never
    inside the table folder: readers such as `pl.scan_parquet(folder)` list every file there.
    `--cache-dir` shares one on purpose."""
    root = Path(os.environ.get("SCOPE_CACHE") or Path.home() / ".cache" / "scope") / "requests"
    if "://" not in out:
        return str(root / sha256_hex(str(Path(out).expanduser().resolve()))[:16])
    return str(root)


class OpenAIGenerationEngine:
    """Completions-API client with bounded concurrency, retries and a payload-hash cache."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        tokenizer: str | None = None,
        max_model_len: int | None = None,
        cache_dir: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 600.0,
        api_key: str | None = None,
        trust_remote_code: bool = False,
        **_ignored: Any,
    ) -> None:
        self.spec = spec
        self.base_url = spec.target.rstrip("/")
        self.model = spec.model
        source = str(resolve(spec, tokenizer).tokenizer_path)
        try:
            self.tokenizer = load_tokenizer(source, trust_remote_code)
        except OSError as e:
            raise FileNotFoundError(
                f"openai engine: cannot load the policy tokenizer {source!r} (pass the model "
                f"folder with --tokenizer): {e}"
            ) from None
        self.max_model_len = max_model_len or _context_length(self.tokenizer)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_concurrency = max(1, max_concurrency)
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.sent = 0  # requests that reached the network (not served from the cache)

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        """The JSON body of one completions request (`top_k`, a vLLM extension, only when on)."""
        body = {
            "model": self.model,
            "prompt": list(req.prompt_token_ids) + list(req.prefix_token_ids),
            "n": req.n, "seed": req.seed, "temperature": req.temperature, "top_p": req.top_p,
            "max_tokens": req.max_new_tokens, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        return {**body, "top_k": req.top_k} if req.top_k > 0 else body

    def generate(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]]:
        """One list of n results per request, in request order."""
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="scope-openai") as ex:
            bodies = list(ex.map(self._complete, [self.payload(r) for r in requests]))
        return [[self._result(c) for c in sorted(b["choices"], key=lambda c: c["index"])]
                for b in bodies]

    def check_reply(self, body: Any, n: int) -> str | None:
        """Why a completions reply cannot be used (None when it can): see the module doc."""
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            return "no 'choices' list"
        choices = body["choices"]
        if len(choices) != n:
            return f"{len(choices)} choices, expected {n}"
        vocab = len(self.tokenizer)
        indices = []
        for i, c in enumerate(choices):
            if not isinstance(c, dict):
                return f"choice {i} is not an object"
            index = c.get("index")
            if isinstance(index, bool) or not isinstance(index, int):
                return f"choice {i} has no integer 'index' (got {index!r:.40})"
            indices.append(index)
            if not isinstance(c.get("text") or "", str):
                return f"choice {i}: 'text' is not a string"
            lp = c.get("logprobs") or {}
            if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs") or [], list):
                return f"choice {i}: 'logprobs' is not an object with a token_logprobs list"
            for x in lp.get("token_logprobs") or []:
                if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))
                                      or not -math.inf < x <= LOGPROB_SLACK):
                    return f"choice {i}: log-prob {x!r:.40} is not a number <= 0"
            ids = c.get("token_ids")
            if ids is not None:
                if not isinstance(ids, list):
                    return f"choice {i}: 'token_ids' is not a list"
                for t in ids:
                    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                        return (f"choice {i}: token id {t!r:.40} is outside the policy "
                                f"vocabulary [0, {vocab})")
            tokens = lp.get("tokens")
            if tokens is not None and not isinstance(tokens, list):
                return f"choice {i}: logprobs 'tokens' is not a list"
            for t in tokens or []:
                if (m := re.fullmatch(r"token_id:(-?\d+)", str(t))) and not 0 <= int(
                        m.group(1)) < vocab:
                    return f"choice {i}: {t!r:.40} is outside the policy vocabulary [0, {vocab})"
        if sorted(indices) != list(range(n)):
            return f"choice indices {sorted(indices)[:8]} are not 0..{n - 1}"
        return None

    # -- one request ---------------------------------------------------------------------
    def _complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        key = sha256_hex(canonical_json(payload))
        cached = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if cached is not None and cached.is_file():
            try:
                body = json.loads(cached.read_text())
            except ValueError:
                body = None
            if self.check_reply(body, payload["n"]) is None:
                return body
        body = self._post("/completions", payload)
        problem = self.check_reply(body, payload["n"])
        if problem is not None:
            raise RuntimeError(f"openai engine: {self.base_url}/completions returned an invalid "
                               f"reply: {problem}")
        if cached is not None:
            write_local_atomic(cached, json.dumps(body))
        return body

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.sent += 1
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                last = f"HTTP {e.code} {detail}".strip()
                if e.code not in RETRY_STATUS:
                    raise RuntimeError(f"openai engine: POST {url} failed: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RuntimeError(
            f"openai engine: POST {url} failed after {self.max_retries + 1} attempts; "
            f"last error: {last}"
        )

    def _result(self, choice: dict[str, Any]) -> GenerationResult:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        logprobs = [float("nan") if x is None else float(x) for x in lp.get("token_logprobs") or []]
        ids = choice.get("token_ids")
        if ids is None and lp.get("tokens") and all(
            re.fullmatch(r"token_id:\d+", str(t)) for t in lp["tokens"]
        ):
            ids = [int(str(t).split(":", 1)[1]) for t in lp["tokens"]]
        if ids is None:  # plain OpenAI-compatible server: re-tokenise with the policy tokenizer
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(logprobs) != len(ids):
            logprobs = [math.nan] * len(ids)
        finish = choice.get("finish_reason") or "error"
        return GenerationResult(list(ids), text, logprobs,
                                finish if finish in ("stop", "length") else "error")

    def close(self) -> None:
        pass


def _context_length(tokenizer: Any) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else 32768
