"""Engines: generation (hf, vllm, openai), PRMs and teachers behind one spec string."""

from pipelines.engines.base import (
    EngineSpec,
    GenerationRequest,
    GenerationResult,
    SpecError,
    load_generation_engine,
    load_prm,
    parse_spec,
)

__all__ = [
    "EngineSpec", "GenerationRequest", "GenerationResult", "SpecError",
    "load_generation_engine", "load_prm", "parse_spec",
]
