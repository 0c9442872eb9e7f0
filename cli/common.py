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


def storage_options(text: str | None) -> dict[str, Any] | None:
    """Parse --storage-options (or $SCOPE_STORAGE_OPTIONS) as a JSON object."""
    text = text or os.environ.get("SCOPE_STORAGE_OPTIONS")
    return json_object(text, "--storage-options") if text else None


def json_object(text: str, flag: str) -> dict[str, Any]:
    """An option value that must be a JSON object (typer.BadParameter otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{flag} must be a JSON object")
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
