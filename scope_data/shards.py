"""The shard store: a table is a folder of Parquet part files plus a manifest (layout:
`scope_data.layout`).

Protocol (DESIGN.md section 3, datatrove's rules):
- a writer first claims the folder (`scope_data.ownership`: `.scope/claim-<config hash>.parquet`;
  refused when the folder is or lies in an input, holds files scope did not write, another
  table kind or another config's table or claim).
- shard k of N writes `part-{k:05d}-of-{N:05d}.parquet`, then its completion marker
  `.scope/part-{k:05d}-of-{N:05d}.done.parquet` (rows, sha256, bytes, config hash, stats). On
  local disk the part is written to a temporary name and renamed; on object stores the PUT of
  the whole object is the atomic step. A part without its marker is unfinished and invisible.
- `finalize` (called by whichever shard finishes last, or by hand) writes the manifest
  `.scope/manifest.parquet` only when all N markers exist with the same config hash and no
  other config claimed the folder meanwhile, then withdraws its claim. Readers
  use the manifest's file list, never a glob; a folder without a manifest is an unfinished
  stage.
- Any fsspec URL works (local paths, `memory://`, `s3://` ...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from scope_data.folder import Folder, HashingWriter
from scope_data.hashing import config_hash, sha256_hex
from scope_data.layout import (
    LEGACY_MANIFEST,
    MANIFEST,
    META_DIR,
    TEMP_RE,
    claim_name,
    marker_name,
    part_name,
    record_bytes,
    record_payload,
    unfinished_hint,
)
from scope_data.manifest_fields import manifest_problem
from scope_data.ownership import check_owner, claim_output, release
from scope_data.provenance import redact, versions
from scope_data.schema import SCHEMA_VERSION, conform, empty_table, schema_for, validate

METADATA_LIMIT = 64 << 20  # bytes: a manifest or marker is read whole, so it is bounded


class ShardError(RuntimeError):
    """A table folder is missing, unfinished, corrupted or unsafe; the message names the path."""


@dataclass
class Manifest:
    """The parsed manifest of a finished table."""

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
    sha256: str = ""  # of the manifest's JSON text
    num_shards: int = 1

    @property
    def content_hash(self) -> str:
        """Identity of the table's data (part checksums), independent of when it was written."""
        return sha256_hex("".join(f["sha256"] for f in self.files))[:16]

    def as_input(self) -> dict[str, Any]:
        """How a downstream manifest refers to this table."""
        return {"url": self.url, "table": self.table, "manifest_sha256": self.sha256,
                "config_hash": self.config_hash, "content_hash": self.content_hash}


ROW_GROUP_ROWS = 65_536  # rows per Parquet row group at most: readers stream a group at a time


class ShardWriter:
    """Writes one part file of a table; use `TableStore.part_writer`."""

    def __init__(self, writer: pq.ParquetWriter, table_name: str, where: str):
        self._writer = writer
        self.table_name, self.where, self.rows = table_name, where, 0

    def write(self, table: pa.Table) -> None:
        """Validate and append a batch of rows."""
        table = conform(self.table_name, table, self.where)
        validate(self.table_name, table, self.where)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows


class TableStore:
    """One table folder: write parts, finalize, read back. `url` may be any fsspec URL."""

    def __init__(self, url: str, table_name: str, storage_options: dict[str, Any] | None = None):
        self.folder = Folder(url, storage_options, temp_dir=META_DIR)
        self.url = self.folder.url
        self.table_name = table_name
        self.schema = schema_for(table_name)

    # -- writing ---------------------------------------------------------------------------
    def claim(self, config: dict[str, Any], inputs: Sequence[str] = ()) -> None:
        """Make the folder this config's output (`scope_data.ownership.claim_output`): refused
        (OutputRefused, a ValueError) when it is or lies inside one of `inputs`, holds files
        scope did not write, another table kind, or a table of another config."""
        self._refuse_legacy_layout(part_name(0, 1))
        claim_output(self.folder, self.table_name, config_hash(redact(config)), self.schema,
                     inputs)

    def release(self, config: dict[str, Any]) -> None:
        """Withdraw this config's claim if nothing else was written (`ownership.release`)."""
        release(self.folder, config_hash(redact(config)))

    @contextmanager
    def part_writer(
        self, shard_index: int, num_shards: int, config: dict[str, Any],
        stats: dict[str, Any] | None = None,
    ) -> Iterator[ShardWriter]:
        """Write part `shard_index` of `num_shards`; its marker is written only on success.

        `stats` (a dict the caller may fill while writing) is stored in the marker and summed
        into the manifest.
        """
        name = part_name(shard_index, num_shards)
        self._refuse_legacy_layout(name)
        self.claim(config)  # before anything is written or removed
        config = redact(config)
        self.folder.remove(marker_name(shard_index, num_shards))
        try:
            with self.folder.open_atomic(name, fsync=False) as raw:
                hashing = HashingWriter(raw)
                writer = pq.ParquetWriter(hashing, self.schema)
                shard = ShardWriter(writer, self.table_name, f"{self.url}/{name}")
                try:
                    yield shard
                finally:
                    writer.close()
        except BaseException:
            self.release(config)
            raise
        marker = {
            "table": self.table_name, "path": name, "rows": shard.rows,
            "sha256": hashing.digest.hexdigest(), "bytes": hashing.nbytes,
            "config_hash": config_hash(config), "stats": stats or {},
        }
        # no fsync: a marker torn by a power loss is unreadable, hence "part missing" (rerun)
        self.folder.write_bytes(marker_name(shard_index, num_shards),
                                record_bytes(self.schema, json.dumps(marker).encode()), fsync=False)

    def _refuse_legacy_layout(self, part: str) -> None:
        """Tables of the older layout are read, never written into (their bookkeeping files
        beside the parts would outlive the rewrite)."""
        old_marker = part[: -len(".parquet")] + ".json"
        if self.folder.exists(LEGACY_MANIFEST) or self.folder.exists(old_marker):
            raise ShardError(
                f"{self.url} holds a table in the layout of an older scope ({LEGACY_MANIFEST} or "
                "part-*.json beside the parts): write to a new folder, or delete this one"
            )

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

    def part_stats(self, shard_index: int, num_shards: int) -> dict[str, Any]:
        """The stats recorded in part k's marker ({} when the part is not done)."""
        marker = self._marker(shard_index, num_shards)
        return marker.get("stats") or {} if marker is not None else {}

    def unfinalize(self) -> None:
        """Remove the manifest this stage wrote (before a part is rewritten)."""
        self.folder.remove(MANIFEST)

    def missing_parts(self, num_shards: int, config: dict[str, Any]) -> list[str]:
        return [part_name(k, num_shards) for k in range(num_shards)
                if not self.part_done(k, num_shards, config)]

    def finalize(
        self, num_shards: int, config: dict[str, Any], inputs: list[Manifest] | None = None,
    ) -> Manifest:
        """Write the manifest once all parts exist; raise ShardError naming missing ones."""
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
        check_owner(self.folder, self.table_name, chash)
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
        if not self._committed(body):  # a rerun with nothing to do leaves the table as it was
            text = json.dumps(body, indent=1, default=str)
            self.folder.write_bytes(MANIFEST, record_bytes(self.schema, text.encode()))
        self.folder.remove(claim_name(chash))  # ours; the manifest now says who owns the folder
        self.folder.remove_stale_temporaries(TEMP_RE)
        return read_manifest(self.url, self.folder.storage_options)

    def _committed(self, body: dict[str, Any]) -> bool:
        """True when the manifest already commits `body`'s files and inputs under its config."""
        try:
            old = read_manifest(self.url, self.folder.storage_options)
        except ShardError:
            return False
        return (old.config_hash, old.files, old.inputs) == (
            body["config_hash"], body["files"], body["inputs"])

    def write(
        self, table: pa.Table, config: dict[str, Any], inputs: list[Manifest] | None = None,
        stats: dict[str, Any] | None = None, reads: Sequence[str] = (),
    ) -> Manifest:
        """Write a whole table as one part and finalize it. `reads`: other paths the rows came
        from (refused as the output, as are the `inputs` tables)."""
        self.claim(config, [*(m.url for m in inputs or []), *reads])
        self.write_part(table, 0, 1, config, stats)
        return self.finalize(1, config, inputs)

    def _marker(self, shard_index: int, num_shards: int) -> dict[str, Any] | None:
        name = marker_name(shard_index, num_shards)
        part = part_name(shard_index, num_shards)
        if not self.folder.exists(name) or not self.folder.exists(part):
            return None
        try:
            return json.loads(record_payload(self.folder.read_bytes(name, METADATA_LIMIT)))
        except (ValueError, FileNotFoundError):  # torn or removed meanwhile: not done
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
def is_table(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when `url` holds a finished table (a manifest, of either layout)."""
    folder = Folder(url, storage_options)
    return folder.exists(MANIFEST) or folder.exists(LEGACY_MANIFEST)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Parse and check a table's manifest; ShardError names the path on any problem."""
    folder = Folder(url, storage_options)
    # the legacy `_manifest.json` was written by an older scope (plain JSON)
    name = next((n for n in (MANIFEST, LEGACY_MANIFEST) if folder.exists(n)), None)
    if name is None:
        raise ShardError(
            f"{folder.url}: no manifest ({MANIFEST}); the stage that writes this table has not "
            f"finished{unfinished_hint(folder)}"
        )
    try:
        payload = folder.read_bytes(name, METADATA_LIMIT)
        payload = record_payload(payload) if name == MANIFEST else payload
    except ValueError as e:
        raise ShardError(f"{folder.url}/{name}: not a table manifest ({e})") from None
    where = f"{folder.url}/{name}"
    try:
        text = payload.decode("utf-8")
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("files", []), list):
        raise ShardError(f"{where}: not a table manifest (expected an object with a 'files' "
                         "list)")
    version = body.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ShardError(f"{where}: schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise ShardError(
            f"{where}: schema_version {version!r} is newer than this code supports "
            f"({SCHEMA_VERSION}); upgrade scope to read it"
        )
    problem = manifest_problem(body)
    if problem is not None:
        raise ShardError(f"{where}: {problem}")
    seen: set[str] = set()
    for entry in body["files"]:  # each one checked by manifest_problem
        path = entry["path"]
        if path in seen:
            raise ShardError(f"{where}: lists part {path!r} twice (refused: its rows would be "
                             "read twice)")
        seen.add(path)
    known = {f for f in Manifest.__dataclass_fields__ if f not in ("url", "sha256")}
    return Manifest(url=folder.url, sha256=sha256_hex(text),
                    **{k: v for k, v in body.items() if k in known})


def verify(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Check every part file's sha256 against the manifest (files hashed in parallel)."""
    folder = Folder(manifest.url, storage_options)

    def digest(entry: dict[str, Any]) -> None:
        try:
            found = folder.sha256(entry["path"])
        except FileNotFoundError:
            found = None
        _check_digest(manifest, entry, found)

    with ThreadPoolExecutor(max_workers=_workers(manifest)) as pool:
        list(pool.map(digest, manifest.files))


def _workers(manifest: Manifest) -> int:
    return max(1, min(len(manifest.files), os.cpu_count() or 1))


def _check_rows(manifest: Manifest, entry: dict[str, Any], rows: int) -> None:
    if rows != entry["rows"]:
        raise ShardError(f"{manifest.url}/{entry['path']}: holds {rows} rows, the manifest "
                         f"says {entry['rows']}")


def _check_digest(manifest: Manifest, entry: dict[str, Any], found: str | None) -> None:
    if found is None:
        raise ShardError(f"{manifest.url}/{entry['path']}: listed in the manifest but missing")
    if found != entry["sha256"]:
        raise ShardError(
            f"{manifest.url}/{entry['path']}: sha256 does not match the manifest "
            "(file changed or corrupted after the stage finished)"
        )


READ_ERRORS = (pl.exceptions.PolarsError, pa.ArrowException, OSError, EOFError)
"""What parquet readers raise on a part whose bytes are not the table they claim to be (a
truncated file, invalid UTF-8 in a string column, a bad footer). FileNotFoundError and the other
file-system errors are OSErrors too; they pass through unchanged."""


@contextmanager
def reading(url: str) -> Iterator[None]:
    """Turn a parquet reader's error into ShardError naming the table (`with reading(url):`
    around code that collects a `scan` of it); file-system errors pass through."""
    try:
        yield
    except READ_ERRORS as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ShardError(f"{url}: unreadable table ({type(e).__name__}: {first})") from None


def scan(
    url: str, storage_options: dict[str, Any] | None = None, check: bool = True,
) -> pl.LazyFrame:
    """A polars LazyFrame over exactly the manifest's files (checksums verified if `check`, and
    each part's Parquet footer read: a truncated part is refused here, naming it). Collect it
    `with reading(url):` to get a ShardError for bad content (e.g. invalid UTF-8)."""
    manifest = read_manifest(url, storage_options)
    if check:
        verify(manifest, storage_options)
    folder = Folder(manifest.url, storage_options)
    if check:
        for entry in manifest.files:
            with reading(f"{manifest.url}/{entry['path']}"):
                if folder.is_local:
                    meta = pq.read_metadata(folder.path(entry["path"]))
                else:
                    with folder.fs.open(folder.path(entry["path"]), "rb") as f:
                        meta = pq.read_metadata(f)
            _check_rows(manifest, entry, meta.num_rows)
    paths = [folder.path(f["path"]) for f in manifest.files]
    if not paths:
        return pl.from_arrow(empty_table(manifest.table)).lazy()
    if folder.is_local:
        return pl.scan_parquet(paths)
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    filesystem = PyFileSystem(FSSpecHandler(folder.fs))
    return pl.scan_pyarrow_dataset(ds.dataset(paths, format="parquet", filesystem=filesystem))


def read_arrow(
    url: str, storage_options: dict[str, Any] | None = None, check: bool = True,
) -> pa.Table:
    """The whole table as one Arrow table, in manifest file order.

    Each part's bytes are read once (memory-mapped on local disk, downloaded otherwise) and
    both parsed and, with `check`, hashed from that one buffer, the sha256 in a background
    thread while pyarrow decodes; the table is returned only if every checksum matches.
    """
    manifest = read_manifest(url, storage_options)
    if not manifest.files:
        return empty_table(manifest.table)
    folder = Folder(manifest.url, storage_options)
    tables = []
    with ThreadPoolExecutor(max_workers=_workers(manifest)) as hashing:
        pending = []
        for entry in manifest.files:
            try:
                buf = _part_buffer(folder, entry["path"])
            except FileNotFoundError:
                _check_digest(manifest, entry, None)
            if check:  # hashlib releases the GIL: hashes while pyarrow decodes
                pending.append((entry, hashing.submit(_sha256, buf)))
            try:
                tables.append(pq.read_table(pa.BufferReader(buf)))
                tables[-1].validate(full=True)  # e.g. invalid UTF-8 in a string column
            except (pa.ArrowInvalid, OSError) as e:
                for done, future in pending:  # a checksum error explains a broken file best
                    _check_digest(manifest, done, future.result())
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ShardError(f"{manifest.url}/{entry['path']}: unreadable Parquet part "
                                 f"({first})") from None
        for entry, future in pending:
            _check_digest(manifest, entry, future.result())
    if check:  # after the checksums: a replaced file is explained best by its checksum
        for entry, table in zip(manifest.files, tables, strict=True):
            _check_rows(manifest, entry, table.num_rows)
    return pa.concat_tables(tables)


def read_batches(
    manifest: Manifest, storage_options: dict[str, Any] | None = None, batch_rows: int = 65_536,
) -> Iterator[pa.RecordBatch]:
    """The table's rows in manifest order, in record batches of at most `batch_rows` rows. Part
    files are read a row group at a time, so memory stays bounded. Checksums are not checked
    here (`verify` or `scan` first)."""
    folder = Folder(manifest.url, storage_options)
    for entry in manifest.files:
        path = folder.path(entry["path"])
        with folder.fs.open(path, "rb") if not folder.is_local else nullcontext(path) as source:
            batches = iter(())
            with reading(f"{manifest.url}/{entry['path']}"):
                batches = pq.ParquetFile(source).iter_batches(batch_size=batch_rows)
            while True:
                with reading(f"{manifest.url}/{entry['path']}"):
                    batch = next(batches, None)
                    if batch is not None:
                        batch.validate(full=True)  # e.g. invalid UTF-8 in a string column
                if batch is None:
                    break
                yield batch


def _part_buffer(folder: Folder, name: str) -> pa.Buffer:
    """The bytes of a part file: a memory map on local disk (the page cache, no copy)."""
    if not folder.is_local:
        return pa.py_buffer(folder.read_bytes(name))
    with pa.memory_map(folder.path(name)) as f:
        return f.read_buffer()


def _sha256(buf: pa.Buffer) -> str:
    return hashlib.sha256(buf).hexdigest()
