"""`vllm:<model>`: a PRM served by vLLM's pooling runner, for both PRM families.

    llm = LLM(model, runner="pooling", pooler_config=PoolerConfig(...))
    llm.encode([{"prompt_token_ids": ids}, ...], pooling_task="token_classify")

The input is rendered exactly as the transformers engines do (`prm_inputs.PRMInput`), vLLM returns
per-token outputs with the activation off (ALL pooling; for "tag", STEP pooling without a tag id,
which keeps every token), and the step scores are read at the same tag positions, so both
engines agree and the column order is ours:

- family "cls" (default; `Qwen2ForProcessRewardModel` and other token classifiers): the 2 label
  logits per token; p_k = softmax(z)[1] (a 1-label head: sigmoid).
- family "tag" (Math-Shepherd causal LMs): `returned_token_ids=[good, bad]` keeps 2 vocabulary
  columns of the logits; p_k = softmax([z_good, z_bad])[0].

Context: `max_length` (default the model's max_model_len); longer inputs keep their head and
their tail steps are NaN with status "truncated", as in `prm_hf` (`prm_inputs.split_for_context`).
"""

from __future__ import annotations

import math
from typing import Any

from pipelines.engines.base import PRMScores
from pipelines.engines.prm_inputs import QWEN_PRM_SYSTEM, PRMInput, mark_nan, split_for_context
from pipelines.engines.spec import EngineSpec, load_tokenizer, resolve


class VLLMPRM:
    """PRM scoring through `vllm.LLM(runner="pooling")` (`family`: "cls" or "tag")."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        family: str = "cls",
        step_token: str | None = None,
        good_token: str = "+",
        bad_token: str = "-",
        trust_remote_code: bool = False,
        max_length: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        system_prompt: str = QWEN_PRM_SYSTEM,
        enforce_eager: bool = False,
        seed: int = 0,
        **_: Any,
    ):
        self.spec, self.family = spec, family
        resolved = resolve(spec)
        tokenizer = load_tokenizer(str(resolved.tokenizer_path), trust_remote_code)
        try:
            self.input = PRMInput(tokenizer, family, step_token=step_token,
                                  good_token=good_token, bad_token=bad_token,
                                  system_prompt=system_prompt)
        except ValueError as e:
            raise ValueError(f"{spec}: {e}") from None
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise RuntimeError(f"{spec}: vllm is not installed ({e}); use hf-cls:/hf-tag:") from e
        if family == "tag":  # STEP without a tag id keeps every token; 2 vocabulary columns
            pooler = PoolerConfig(task="token_classify", tok_pooling_type="STEP",
                                  use_activation=False,
                                  returned_token_ids=[self.input.good_id, self.input.bad_id])
        else:  # ALL: every token (STEP would filter on Qwen's hard-coded tag id 151651)
            pooler = PoolerConfig(task="token_classify", tok_pooling_type="ALL",
                                  use_activation=False)
        kwargs: dict[str, Any] = {}
        if max_length is not None:
            kwargs["max_model_len"] = int(max_length)
        self.llm = LLM(
            model=resolved.model_path, runner="pooling", pooler_config=pooler, dtype=dtype,
            trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, seed=seed,
            **kwargs,
        )
        self.max_length = int(self.llm.llm_engine.model_config.max_model_len)

    def score(self, problem: str, steps: list[str]) -> list[float]:
        return self.score_batch([(problem, steps)])[0]

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        return [r.scores for r in self.score_batch_with_status(items)]

    def score_batch_with_status(self, items: list[tuple[str, list[str]]]) -> list[PRMScores]:
        import torch

        encoded = [self.input.encode(problem, list(steps)) for problem, steps in items]
        results, work = split_for_context(encoded, self.max_length)
        if not work:
            return mark_nan(results)
        outputs = self.llm.encode(
            [{"prompt_token_ids": ids} for _, ids, _ in work],
            pooling_task="token_classify", use_tqdm=False,
        )
        for (i, ids, pos), out in zip(work, outputs, strict=True):
            data = torch.as_tensor(out.outputs.data).float()
            if data.shape[0] != len(ids):
                raise RuntimeError(
                    f"{self.spec}: vLLM returned {data.shape[0]} token rows for {len(ids)} "
                    "tokens; the model's pooler config restricts the output"
                )
            keep = [k for k, p in enumerate(pos) if p < len(ids)]
            z = data[[pos[k] for k in keep]]
            if z.shape[-1] == 1:
                probs = torch.sigmoid(z[:, 0])
            else:
                probs = torch.softmax(z, dim=-1)[:, 0 if self.family == "tag" else 1]
            for k, p in zip(keep, probs.tolist(), strict=True):
                results[i].scores[k] = p if math.isfinite(p) else math.nan
        return mark_nan(results)

    def close(self) -> None:
        """Shut the engine core process down now (not at garbage collection)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
