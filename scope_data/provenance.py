"""What a manifest records about how its table was made: the config, without secrets, and the
versions of the packages that shape the data."""

from __future__ import annotations

import functools
from typing import Any

_SECRET_WORDS = {"secret", "password", "token", "credential", "credentials", "key", "apikey"}


def redact(config: Any) -> Any:
    """`config` without storage options and with secret-looking values masked.

    Manifests and part markers record configs; credentials must never reach them.
    """
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            name = str(k).lower()
            if name in ("storage_options", "client_kwargs"):
                continue
            words = set(name.replace("-", "_").split("_"))
            secret = bool(words & _SECRET_WORDS) and isinstance(v, str)
            out[k] = "***" if secret else redact(v)
        return out
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    return config


def versions() -> dict[str, str]:
    """Versions of the packages that shape the data, recorded in every manifest.

    Where torch is loaded, its CPU thread count is recorded too: float results (and so sampled
    tokens) are bit-reproducible only at the same count.
    """
    import sys

    found = dict(_package_versions())
    if "torch" in sys.modules:
        found["torch_threads"] = str(sys.modules["torch"].get_num_threads())
    return found


@functools.cache
def _package_versions() -> tuple[tuple[str, str], ...]:
    """Read once per process: each lookup parses a package's metadata (~7 ms), and a
    long-lived online worker records them for every stage of every round."""
    import importlib.metadata as md
    import platform

    found = [("python", platform.python_version())]
    for pkg in ("scope-rlvr", "pyarrow", "polars", "torch", "transformers", "trl", "vllm"):
        try:
            found.append((pkg, md.version(pkg)))
        except md.PackageNotFoundError:
            continue
    return tuple(found)
