"""Engines kept loaded across stage runs in one long-lived process (online workers).

Offline, every stage loads its engines and closes them at the end. Inside `warm_engines()`,
`load_generation_engine` and `load_prm` return an engine kept from an earlier call instead:

- a PRM (or any engine) asked for with the same spec and options is reused as is;
- a generation engine asked for with the same kind and options but another model folder of the
  same architecture and tokenizer (the next policy version) takes the new weights in place
  (`update_weights`: no restart, vLLM's start-up is paid once), otherwise it is replaced.

Stages still call `close()`: on a kept engine that is a no-op; the engines close when the
context ends. The registry is per process and holds at most one engine per (kind, options).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_ACTIVE: WarmEngines | None = None
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype",
                        "use_cache"}


class _Kept:
    """A kept engine as the stages see it: every attribute of the engine, close() a no-op."""

    def __init__(self, engine: Any) -> None:
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        """Kept loaded until the `warm_engines()` context ends."""


class WarmEngines:
    """The per-process registry behind `warm_engines()`; `stats` counts loads and updates."""

    def __init__(self) -> None:
        self.engines: dict[tuple[str, str, str], tuple[str, Any]] = {}
        self.stats = {"loads": 0, "reuses": 0, "weight_updates": 0}

    def get(self, family: str, spec: Any, options: dict[str, Any],
            load: Callable[[], Any]) -> Any:
        key = (family, spec.kind, json.dumps(options, sort_keys=True, default=str))
        target = str(spec)
        if key in self.engines:
            loaded_target, engine = self.engines[key]
            if loaded_target == target:
                self.stats["reuses"] += 1
                return _Kept(engine)
            if _can_update(engine, spec, loaded_target):
                engine.update_weights(spec.target)
                self.engines[key] = (target, engine)
                self.stats["weight_updates"] += 1
                return _Kept(engine)
            engine.close()
            del self.engines[key]
        engine = load()
        self.stats["loads"] += 1
        self.engines[key] = (target, engine)
        return _Kept(engine)

    def close(self) -> None:
        for _, engine in self.engines.values():
            with contextlib.suppress(Exception):
                engine.close()
        self.engines.clear()


def _can_update(engine: Any, spec: Any, loaded_target: str) -> bool:
    """Local folders of the same architecture (config.json equal up to bookkeeping keys) and
    the same tokenizer, and an engine that can load weights in place."""
    if not hasattr(engine, "update_weights") or spec.kind not in ("hf", "vllm"):
        return False
    old, new = Path(loaded_target.partition(":")[2]), Path(spec.target)

    def config(folder: Path) -> Any:
        try:
            data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}

    loaded = config(old)
    return loaded is not None and loaded == config(new) and _same_tokenizer(old, new)


def _same_tokenizer(old: Path, new: Path) -> bool:
    """tokenizer.json equal, or else the tokenizers as loaded equal (backend, special tokens,
    chat template): a trainer's `save_pretrained` rewrites tokenizer.json (transformers 5 drops
    the BPE `unk_token` it never loaded), so the first trained version's file differs from the
    base model's while the tokenizer the stages use is the same."""
    try:
        if (old / "tokenizer.json").read_bytes() == (new / "tokenizer.json").read_bytes():
            return True
    except OSError:
        return False
    from pipelines.engines.spec import load_tokenizer

    def identity(folder: Path) -> tuple[Any, ...]:
        tok = load_tokenizer(str(folder), local_only=True)
        backend = getattr(tok, "backend_tokenizer", None)
        return (type(tok).__name__, backend.to_str() if backend is not None else None,
                tok.all_special_tokens, getattr(tok, "chat_template", None))

    try:
        return identity(old) == identity(new)
    except (FileNotFoundError, ValueError):
        return False


def active() -> WarmEngines | None:
    """The registry of the enclosing `warm_engines()` context, if any."""
    return _ACTIVE


@contextlib.contextmanager
def warm_engines() -> Iterator[WarmEngines]:
    """Keep engines loaded (and policy weights updated in place) until the context ends."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, WarmEngines()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE.close()
        _ACTIVE = outer
