"""The shard store: a table is a folder of Parquet part files plus `_manifest.json`.

Protocol (DESIGN.md section 3, datatrove's rules):
- shard k of N writes `part-{k:05d}-of-{N:05d}.parquet`, then its completion marker
  `part-{k:05d}-of-{N:05d}.json` (rows, sha256, bytes, config hash, stats). On local disk the
  part is written to a temporary name and renamed; on object stores the PUT of the whole object
  is the atomic step. A part without its marker is unfinished and invisible.
- `finalize` (called by whichever shard finishes last, or by hand) writes `_manifest.json` only
  when all N markers exist with the same config hash. Readers use the manifest's file list,
  never a glob; a folder without a manifest is an unfinished stage.
- Any fsspec URL works (local paths, `memory://`, `s3://` ...).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from scope_data.folder import Folder, HashingWriter
from scope_data.hashing import config_hash, sha256_hex
from scope_data.schema import SCHEMA_VERSION, conform, empty_table, schema_for, validate

MANIFEST = "_manifest.json"


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


class ShardError(RuntimeError):
    """A table folder is missing, unfinished, corrupted or unsafe; the message names the path."""


def part_name(shard_index: int, num_shards: int) -> str:
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
    return f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


def _marker_name(shard_index: int, num_shards: int) -> str:
    return part_name(shard_index, num_shards)[: -len(".parquet")] + ".json"


def versions() -> dict[str, str]:
    """Versions of the packages that shape the data, recorded in every manifest.

    Where torch is loaded, its CPU thread count is recorded too: float results (and so sampled
    tokens) are bit-reproducible only at the same count.
    """
    import importlib.metadata as md
    import platform
    import sys

    found = {"python": platform.python_version()}
    for pkg in ("scope-rlvr", "pyarrow", "polars", "torch", "transformers", "trl", "vllm"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    if "torch" in sys.modules:
        found["torch_threads"] = str(sys.modules["torch"].get_num_threads())
    return found


@dataclass
class Manifest:
    """The parsed `_manifest.json` of a finished table."""

    url: str
    table: str
    schema_version: int
    files: list[dict[str, Any]]
    rows: int
    config: dict[str, Any]
    config_hash: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    scope_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the manifest file itself
    num_shards: int = 1

    @property
    def content_hash(self) -> str:
        """Identity of the table's data (part checksums), independent of when it was written."""
        return sha256_hex("".join(f["sha256"] for f in self.files))[:16]

    def as_input(self) -> dict[str, Any]:
        """How a downstream manifest refers to this table."""
        return {"url": self.url, "table": self.table, "manifest_sha256": self.sha256,
                "config_hash": self.config_hash, "content_hash": self.content_hash}


class ShardWriter:
    """Writes one part file of a table; use `TableStore.part_writer`."""

    def __init__(self, writer: pq.ParquetWriter, table_name: str, where: str):
        self._writer = writer
        self.table_name, self.where, self.rows = table_name, where, 0

    def write(self, table: pa.Table) -> None:
        """Validate and append a batch of rows."""
        table = conform(self.table_name, table, self.where)
        validate(self.table_name, table, self.where)
        self._writer.write_table(table)
        self.rows += table.num_rows


class TableStore:
    """One table folder: write parts, finalize, read back. `url` may be any fsspec URL."""

    def __init__(self, url: str, table_name: str, storage_options: dict[str, Any] | None = None):
        self.folder = Folder(url, storage_options)
        self.url = self.folder.url
        self.table_name = table_name

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def part_writer(
        self, shard_index: int, num_shards: int, config: dict[str, Any],
        stats: dict[str, Any] | None = None,
    ) -> Iterator[ShardWriter]:
        """Write part `shard_index` of `num_shards`; its marker is written only on success.

        `stats` (a dict the caller may fill while writing) is stored in the marker and summed
        into the manifest.
        """
        config = redact(config)
        name = part_name(shard_index, num_shards)
        self.folder.remove(_marker_name(shard_index, num_shards))
        schema = schema_for(self.table_name)
        with self.folder.open_atomic(name, fsync=False) as raw:
            hashing = HashingWriter(raw)
            writer = pq.ParquetWriter(hashing, schema)
            shard = ShardWriter(writer, self.table_name, f"{self.url}/{name}")
            try:
                yield shard
            finally:
                writer.close()
        marker = {
            "path": name, "rows": shard.rows, "sha256": hashing.digest.hexdigest(),
            "bytes": hashing.nbytes, "config_hash": config_hash(config),
            "stats": stats or {},
        }
        # no fsync: a marker torn by a power loss is unreadable, hence "part missing" (rerun)
        self.folder.write_text(_marker_name(shard_index, num_shards), json.dumps(marker),
                               fsync=False)

    def write_part(
        self, table: pa.Table, shard_index: int, num_shards: int, config: dict[str, Any],
        stats: dict[str, Any] | None = None,
    ) -> None:
        """Write a whole part at once."""
        with self.part_writer(shard_index, num_shards, config, stats) as w:
            w.write(table)

    def part_done(self, shard_index: int, num_shards: int, config: dict[str, Any]) -> bool:
        """True when part k of N exists with its marker and was written with this config."""
        marker = self._marker(shard_index, num_shards)
        return marker is not None and marker["config_hash"] == config_hash(redact(config))

    def missing_parts(self, num_shards: int, config: dict[str, Any]) -> list[str]:
        return [part_name(k, num_shards) for k in range(num_shards)
                if not self.part_done(k, num_shards, config)]

    def finalize(
        self, num_shards: int, config: dict[str, Any], inputs: list[Manifest] | None = None,
    ) -> Manifest:
        """Write `_manifest.json` once all parts exist; raise ShardError naming missing ones."""
        config = redact(config)
        chash = config_hash(config)
        markers = []
        missing = []
        for k in range(num_shards):
            marker = self._marker(k, num_shards)
            if marker is None or marker["config_hash"] != chash:
                missing.append(part_name(k, num_shards))
            else:
                markers.append(marker)
        if missing:
            raise ShardError(
                f"{self.url}: cannot finalize table {self.table_name!r}: "
                f"{len(missing)} of {num_shards} parts missing or from another config: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        stats: dict[str, Any] = {}
        for marker in markers:
            add_stats(stats, marker["stats"])
        found = versions()
        body = {
            "table": self.table_name, "schema_version": SCHEMA_VERSION,
            "files": [{k: m[k] for k in ("path", "rows", "sha256", "bytes")} for m in markers],
            "rows": sum(m["rows"] for m in markers), "num_shards": num_shards,
            "config": config, "config_hash": chash,
            "inputs": [m.as_input() for m in inputs or []], "stats": stats,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "scope_version": found.get("scope-rlvr", "0"), "versions": found,
        }
        self.folder.write_text(MANIFEST, json.dumps(body, indent=1, default=str))
        self.folder.remove_stale_temporaries()
        return read_manifest(self.url, self.folder.storage_options)

    def write(
        self, table: pa.Table, config: dict[str, Any], inputs: list[Manifest] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write a whole table as one part and finalize it."""
        self.write_part(table, 0, 1, config, stats)
        return self.finalize(1, config, inputs)

    def _marker(self, shard_index: int, num_shards: int) -> dict[str, Any] | None:
        name = _marker_name(shard_index, num_shards)
        part = part_name(shard_index, num_shards)
        if not self.folder.exists(name) or not self.folder.exists(part):
            return None
        try:
            return json.loads(self.folder.read_text(name))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None


def add_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Sum numbers and nested count dicts (e.g. status counts) across parts."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_stats(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)


# -- reading ---------------------------------------------------------------------------------
def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Parse and check a table's manifest; ShardError names the path on any problem."""
    folder = Folder(url, storage_options)
    if not folder.exists(MANIFEST):
        raise ShardError(
            f"{folder.url}: no {MANIFEST}; the stage that writes this table has not finished"
            f"{_unfinished_hint(folder)}"
        )
    try:
        text = folder.read_text(MANIFEST)
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{folder.url}/{MANIFEST}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("files", []), list):
        raise ShardError(f"{folder.url}/{MANIFEST}: not a table manifest (expected an object "
                         "with a 'files' list)")
    version = body.get("schema_version")
    if not isinstance(version, int):
        raise ShardError(f"{folder.url}/{MANIFEST}: schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise ShardError(
            f"{folder.url}/{MANIFEST}: schema_version {version!r} is newer than this code "
            f"supports ({SCHEMA_VERSION}); upgrade scope to read it"
        )
    for entry in body.get("files", []):
        _check_relative(folder.url, entry.get("path", ""))
    known = {f for f in Manifest.__dataclass_fields__ if f not in ("url", "sha256")}
    return Manifest(url=folder.url, sha256=sha256_hex(text),
                    **{k: v for k, v in body.items() if k in known})


def _unfinished_hint(folder: Folder) -> str:
    """" (k of N parts done; missing: part-...)" for a folder holding parts of an unfinished
    table, "" when it holds none."""
    import re

    if not folder.fs.exists(folder.root):
        return ""
    names = {posixpath.basename(p.rstrip("/")) for p in folder.fs.ls(folder.root, detail=False)}
    done: dict[int, set[int]] = {}
    for name in names:
        m = re.fullmatch(r"part-(\d{5})-of-(\d{5})\.json", name)
        if m and m.group(0)[:-5] + ".parquet" in names:
            done.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not done:
        parts = sum(n.endswith(".parquet") for n in names)
        return f" ({parts} unfinished part files present)" if parts else ""
    n, have = max(done.items(), key=lambda kv: len(kv[1]))
    missing = [part_name(k, n) for k in range(n) if k not in have]
    if not missing:
        return f" (all {n} parts done but not finalized: rerun the stage to write the manifest)"
    more = " ..." if len(missing) > 5 else ""
    return f" ({len(have)} of {n} parts done; missing: {', '.join(missing[:5])}{more})"


def _check_relative(url: str, path: str) -> None:
    """Refuse manifest entries that could point outside the table folder."""
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith(("/", "~")) or ":" in path or ".." in parts or len(parts) != 1:
        raise ShardError(f"{url}/{MANIFEST}: unsafe file path {path!r} in the file list (refused)")


def verify(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Check every part file's sha256 against the manifest (files hashed in parallel)."""
    pending = _start_verify(manifest, storage_options)
    _finish_verify(manifest, pending)


def _start_verify(
    manifest: Manifest, storage_options: dict[str, Any] | None,
) -> list[tuple[dict[str, Any], Future[str | None]]]:
    """Hash the parts in background threads (hashlib releases the GIL) while the caller reads."""
    folder = Folder(manifest.url, storage_options)

    def digest(name: str) -> str | None:
        try:
            return folder.sha256(name)
        except FileNotFoundError:
            return None

    pool = ThreadPoolExecutor(max_workers=max(1, min(len(manifest.files), os.cpu_count() or 1)))
    pending = [(entry, pool.submit(digest, entry["path"])) for entry in manifest.files]
    pool.shutdown(wait=False)
    return pending


def _finish_verify(
    manifest: Manifest, pending: list[tuple[dict[str, Any], Future[str | None]]],
) -> None:
    for entry, future in pending:
        found = future.result()
        if found is None:
            raise ShardError(f"{manifest.url}/{entry['path']}: listed in the manifest but missing")
        if found != entry["sha256"]:
            raise ShardError(
                f"{manifest.url}/{entry['path']}: sha256 does not match the manifest "
                "(file changed or corrupted after the stage finished)"
            )


def _arrow_source(manifest: Manifest, storage_options: dict[str, Any] | None) -> tuple:
    """(paths, pyarrow filesystem or None for local disk) of the manifest's part files."""
    folder = Folder(manifest.url, storage_options)
    paths = [folder.path(f["path"]) for f in manifest.files]
    if folder.is_local:
        return paths, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return paths, PyFileSystem(FSSpecHandler(folder.fs))


def scan(
    url: str, storage_options: dict[str, Any] | None = None, check: bool = True,
) -> pl.LazyFrame:
    """A polars LazyFrame over exactly the manifest's files (checksums verified if `check`)."""
    manifest = read_manifest(url, storage_options)
    if check:
        verify(manifest, storage_options)
    paths, filesystem = _arrow_source(manifest, storage_options)
    if not paths:
        return pl.from_arrow(empty_table(manifest.table)).lazy()
    if filesystem is None:
        return pl.scan_parquet(paths)
    import pyarrow.dataset as ds

    return pl.scan_pyarrow_dataset(ds.dataset(paths, format="parquet", filesystem=filesystem))


def read_arrow(
    url: str, storage_options: dict[str, Any] | None = None, check: bool = True,
) -> pa.Table:
    """The whole table as one Arrow table, in manifest file order.

    With `check`, the sha256 of each part is computed in background threads (on local disk
    while pyarrow decodes), and the table is returned only if every checksum matches.
    """
    manifest = read_manifest(url, storage_options)
    paths, filesystem = _arrow_source(manifest, storage_options)
    pending = _start_verify(manifest, storage_options) if check else []
    if filesystem is not None:  # fsspec file objects may be shared (memory://): hash first
        _finish_verify(manifest, pending)
    if not paths:
        return empty_table(manifest.table)
    try:
        table = pq.read_table(paths, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as e:
        _finish_verify(manifest, pending)  # a checksum error explains a broken file best
        raise ShardError(f"{manifest.url}: unreadable Parquet part ({e})") from None
    _finish_verify(manifest, pending)
    return table
