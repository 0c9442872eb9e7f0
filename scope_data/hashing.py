"""Deterministic ids and hashes: stable across runs, machines and Python versions."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, the input of every config hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits identifying a stage config."""
    return sha256_hex(canonical_json(config))[:16]


def stable_id(*parts: Any) -> str:
    """A 16-hex-digit id from the parts (problem_id, rollout_id, ...)."""
    return sha256_hex("\x1f".join(str(p) for p in parts))[:16]


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed derived from the parts, e.g. (seed, problem_id, sample_idx)."""
    return int(sha256_hex("\x1f".join(str(p) for p in parts))[:8], 16) & 0x7FFFFFFF
