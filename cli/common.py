"""Helpers shared by the CLI commands: storage options and user-facing errors."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

STORAGE_OPTIONS_HELP = (
    "fsspec storage options as JSON (e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'); "
    "default: $SCOPE_STORAGE_OPTIONS. Credentials are never written to manifests."
)


def storage_options(text: str | None) -> dict[str, Any] | None:
    """Parse --storage-options (or $SCOPE_STORAGE_OPTIONS) as a JSON object."""
    text = text or os.environ.get("SCOPE_STORAGE_OPTIONS")
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("--storage-options must be a JSON object")
    return value


def user_errors(fn: F) -> F:
    """Turn expected errors (bad input, missing tables, bad specs) into one red line + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from scope_data.schema import SchemaError
        from scope_data.shards import ShardError

        try:
            return fn(*args, **kwargs)
        except (ShardError, SchemaError, ValueError, FileNotFoundError, RuntimeError) as e:
            if isinstance(e, typer.Exit):
                raise
            Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
