"""Build-cache plumbing shared by the tiny-model kits (``tiny.policy``, ``tiny.prm``).

A build lives in a folder holding ``scope_tiny.json`` with its ``config_hash``; it is written into
a temporary sibling folder and renamed into place, under an advisory file lock, so a crashed or
concurrent build never leaves a half-written folder visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

META_FILE = "scope_tiny.json"


def cache_root() -> Path:
    """``$SCOPE_CACHE`` (default ``~/.cache/scope``)."""
    return Path(os.environ.get("SCOPE_CACHE") or Path.home() / ".cache" / "scope")


def is_build(path: Path, key: str) -> bool:
    """True if `path` holds a finished build whose config hash is `key`."""
    meta = path / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("config_hash") == key
    except (OSError, ValueError):
        return False


def atomic_place(target: Path, fill: Any) -> None:
    """Fill a temporary sibling folder of ``target``, then rename it into place.

    Call it holding :func:`file_lock` for ``target``: temporary folders left by killed builds
    of the same target are removed first. An existing ``target`` is replaced only if it is
    empty or an earlier build; any other non-empty folder is refused.
    """
    if target.exists() and any(target.iterdir()) and not (target / META_FILE).is_file():
        raise FileExistsError(f"{target} exists and is not a tiny build; refusing to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


SHIPPED_DIR = Path(__file__).resolve().parent / "builds"


def shipped_build(key: str) -> Path | None:
    """The build ``key`` shipped inside the package (``pipelines/tiny/builds/<key>``), if any.

    The default tiny policy and teacher ship prebuilt (a few MB), so a fresh clone's first
    demo skips their 10-20 minute build; any other config (or a changed build recipe, which
    changes the hash) is built as before.
    """
    path = SHIPPED_DIR / key
    return path if is_build(path, key) else None


def cached_build(
    target: Path, cached: Path, key: str, build: Callable[[Path], None], force: bool = False
) -> Path:
    """Make ``target`` hold the build ``key`` and return it.

    Reused when already there; copied from ``cached`` (the cache folder, when ``target`` is
    elsewhere) or from the builds shipped with scope (:func:`shipped_build`) when one holds it;
    else ``build(tmp)`` fills a temporary folder renamed into place. All under a file lock, so
    concurrent callers build once. ``force`` rebuilds.
    """
    if not force and is_build(target, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if not force and is_build(target, key):  # built by a concurrent process meanwhile
            return target
        source = cached if target != cached and is_build(cached, key) else shipped_build(key)
        if source is not None and not force:
            atomic_place(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
        else:
            atomic_place(target, build)
    return target


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` torch CPU threads (None: unchanged), restoring the old count.

    Float sums, and so sampled tokens, are bit-reproducible only at one thread count: a build
    must not leave its count behind for the rest of the process.
    """
    if not num_threads:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Silence datasets/transformers progress bars unless ``verbose``."""
    if verbose:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
