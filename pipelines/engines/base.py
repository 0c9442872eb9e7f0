"""The interfaces every engine implements, and loading an engine from its spec (`engines.spec`).

Generation engines (policy sampling and teachers) take token-id requests and return sampled
token ids with their temperature-processed log-probs; PRM engines return P(step correct) per
step, higher = correct. Engine modules import their heavy dependencies lazily.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipelines.engines.spec import EngineSpec, parse_spec

# kind -> "module:Class"; modules are imported only when a spec of that kind is loaded.
GENERATION_ENGINES = {
    "hf": "pipelines.engines.hf:HFGenerationEngine",
    "vllm": "pipelines.engines.vllm_engine:VLLMGenerationEngine",
    "openai": "pipelines.engines.openai_engine:OpenAIGenerationEngine",
}
PRM_ENGINES = {
    "rule": "pipelines.engines.prm_rule:RulePRM",
    "hf-cls": "pipelines.engines.prm_hf:HFClsPRM",
    "hf-tag": "pipelines.engines.prm_hf:HFTagPRM",
    "vllm": "pipelines.engines.prm_vllm:VLLMPRM",
    "noisy": "pipelines.engines.prm_noisy:NoisyPRM",
}


def check_remote_code(target: str, trust_remote_code: bool = False) -> None:
    """Refuse a local model folder whose config asks for custom Python code (an `auto_map` in
    config.json or tokenizer_config.json) unless the user passed --trust-remote-code.

    transformers would otherwise ignore the `auto_map` of a known `model_type` and silently load
    a different (built-in) class than the folder declares.
    """
    import json
    from pathlib import Path

    folder = Path(target).expanduser()
    if trust_remote_code or not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            classes = ", ".join(sorted({str(v) for v in auto_map.values()}))[:200]
            raise ValueError(
                f"{folder / name} asks for custom code (auto_map: {classes}); scope does not run "
                "code shipped with a model unless you pass --trust-remote-code "
                "(trust_remote_code=True)"
            )


def _engine_class(table: dict[str, str], kind: str) -> Any:
    module_name, class_name = table[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _load(table: dict[str, str], spec: EngineSpec, **options: Any) -> Any:
    return _engine_class(table, spec.kind)(spec, **options)


def _kept_options(table: dict[str, str], spec: EngineSpec, options: dict[str, Any]) -> dict:
    """The options that tell kept engines apart (`warm`): those the engine class names. Options
    its `**_ignored` absorbs change nothing in the engine (the openai engine's `cache_dir`, one
    per output folder, would otherwise start another vLLM engine every round)."""
    params = inspect.signature(_engine_class(table, spec.kind).__init__).parameters
    if "_ignored" not in params:
        return options
    return {k: v for k, v in options.items() if k in params and k != "_ignored"}


@dataclass
class GenerationRequest:
    """Sample `n` continuations of prompt_token_ids (+ prefix_token_ids, a partial response)."""

    prompt_token_ids: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    top_k: int = 0  # 0 or -1: off (vLLM's and TRL's convention)
    seed: int = 0
    prefix_token_ids: list[int] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One sampled continuation: only the NEW tokens (after any prefix), their text and
    log-probs under the temperature/top-k/top-p-processed distribution, and why it stopped
    ("stop": EOS or a stop string, "length": max_new_tokens, "error": engine failure)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


class GenerationEngine(Protocol):
    spec: EngineSpec
    tokenizer: Any  # the engine's Hugging Face tokenizer
    max_model_len: int

    def generate(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]]:
        """One list of n results per request, in request order."""
        ...

    def close(self) -> None: ...


class WeightUpdatable(Protocol):
    """A generation engine that can take a newer policy version without a restart (hf, vllm)."""

    def update_weights(self, model_dir: str) -> None:
        """Load the weights of the HF folder `model_dir` (same architecture) in place."""
        ...


def read_safetensors(model_dir: str) -> dict[str, Any]:
    """Every tensor of the safetensors weights of an HF folder (single file or sharded index).

    Only safetensors are read (pickled .bin weights can run code)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or index); scope loads "
                                "safetensors weights only")
    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(str(folder / Path(name).name)))
    return state


class PRMEngine(Protocol):
    """Optionally also `score_batch_with_status(items) -> list[PRMScores]` (statuses such as
    "truncated"); callers use `score_with_status`, which falls back to `score_batch`."""

    spec: EngineSpec
    max_length: int

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """P(step correct) for each (problem, steps) pair; NaN where the model gave NaN."""
        ...


@dataclass
class PRMScores:
    """Step scores of one (problem, steps) item and why some may be missing.

    status: "ok"; "truncated" (the input exceeded the PRM's context: the steps past it are NaN);
    "nan" (the model gave a non-finite score, stored as NaN).
    """

    scores: list[float]
    status: str = "ok"


def score_with_status(prm: PRMEngine, items: list[tuple[str, list[str]]]) -> list[PRMScores]:
    """`prm.score_batch_with_status(items)` when the engine has it, else `score_batch` with
    status "nan" for rows holding a non-finite score. Non-finite values become NaN."""
    import math

    rich = getattr(prm, "score_batch_with_status", None)
    if rich is not None:
        results = list(rich(items))
    else:
        results = [PRMScores([float(x) for x in row]) for row in prm.score_batch(items)]
    if len(results) != len(items):
        raise RuntimeError(f"PRM {prm.spec} returned {len(results)} rows for {len(items)} items")
    for (_, steps), res in zip(items, results, strict=True):
        if len(res.scores) != len(steps):
            raise RuntimeError(
                f"PRM {prm.spec} returned {len(res.scores)} scores for {len(steps)} steps"
            )
        bad = [i for i, x in enumerate(res.scores) if not math.isfinite(x)]
        for i in bad:
            res.scores[i] = math.nan
        if bad and res.status == "ok":
            res.status = "nan"
    return results


def load_generation_engine(spec: str | EngineSpec, **options: Any) -> GenerationEngine:
    """Instantiate the generation engine for `spec` (hf:, vllm:, openai:)."""
    from pipelines.engines import warm

    parsed = spec if isinstance(spec, EngineSpec) else parse_spec(spec, "generation")
    kept = warm.active()
    if kept is not None:
        return kept.get("generation", parsed,
                        _kept_options(GENERATION_ENGINES, parsed, options),
                        lambda: _load(GENERATION_ENGINES, parsed, **options))
    return _load(GENERATION_ENGINES, parsed, **options)


def load_prm(spec: str | EngineSpec, **options: Any) -> PRMEngine:
    """Instantiate the PRM engine for `spec` (rule:, hf-cls:, hf-tag:, vllm:, noisy:)."""
    from pipelines.engines import warm

    parsed = spec if isinstance(spec, EngineSpec) else parse_spec(spec, "prm")
    kept = warm.active()
    if kept is not None:
        return kept.get("prm", parsed, _kept_options(PRM_ENGINES, parsed, options),
                        lambda: _load(PRM_ENGINES, parsed, **options))
    return _load(PRM_ENGINES, parsed, **options)
