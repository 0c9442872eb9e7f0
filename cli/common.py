"""Helpers shared by the CLI commands: storage options and user-facing errors."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
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


PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                     for name in ("cli", "pipelines", "scope_data"))
FILE_SYSTEM_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                      IsADirectoryError)


def debug_enabled() -> bool:
    """`scope --debug ...` or SCOPE_DEBUG=1: every error shows its traceback."""
    return os.environ.get("SCOPE_DEBUG", "") not in ("", "0")


def is_user_error(e: BaseException) -> bool:
    """True for an error scope raised on purpose about the user's input (a bad option, table,
    spec or path): a ValueError or RuntimeError raised by a `raise` in this project's own code, or
    a file-system error. An error raised inside a library (polars, torch, ...) or of another type
    (KeyError, TypeError, ...) is unexpected: a bug, shown with its traceback."""
    if isinstance(e, FILE_SYSTEM_ERRORS):
        return True
    if not isinstance(e, (ValueError, RuntimeError)):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIRS)


def user_errors(fn: F) -> F:
    """User errors become one red line + exit 1; unexpected errors keep their traceback (as do
    all errors with --debug). Messages go through `console.printable`: values from tables or
    files never become terminal markup or control sequences."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            Console(stderr=True).print(
                f"interrupted: scope {fn.__name__.replace('_', '-')} stopped; finished "
                "parts are kept and a rerun of the same command resumes", highlight=False,
                soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled() or not is_user_error(e):
                raise
            from pipelines.console import printable

            Console(stderr=True).print(f"[bold red]error:[/] {printable(e)}", highlight=False,
                                       soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
