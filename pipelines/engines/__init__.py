"""Engines: generation (hf, vllm, openai), PRMs and teachers behind one spec string."""

from pipelines.engines.base import (
    GenerationRequest,
    GenerationResult,
    load_generation_engine,
    load_prm,
)
from pipelines.engines.spec import EngineSpec, SpecError, parse_spec, resolve

__all__ = [
    "EngineSpec", "GenerationRequest", "GenerationResult", "SpecError",
    "load_generation_engine", "load_prm", "parse_spec", "resolve",
]
