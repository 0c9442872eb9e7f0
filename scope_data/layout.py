"""The layout of a table folder, chosen so that any Parquet reader pointed at it sees the rows.

    rollouts/
      part-00000-of-00002.parquet          the rows of shard 0 of 2 (deterministic names)
      part-00001-of-00002.parquet
      .scope/                              bookkeeping (hidden)
        part-00000-of-00002.done.parquet   completion marker of part 0
        manifest.parquet                   the commit, written last: the list of parts
        claim-<config hash>.parquet        the writer's claim: which table and config own it
        .<name>.<host>-<pid>.<hex>.tmp     files being written (local disk)

Every finished file below the folder is a Parquet file with the table's schema: the
bookkeeping files hold zero rows and carry their JSON record in the Parquet footer (key
``scope``). Readers differ in what they skip (``pl.scan_parquet(folder)`` reads every file
below a folder and refuses mixed file extensions; ``datasets``' ``data_dir``,
``pyarrow.dataset`` and pandas skip hidden names; duckdb's ``folder/*.parquet`` does not
descend), and each of them gets exactly the table's rows. scope itself reads the manifest's
file list, never a listing.

Tables written before this layout (``_manifest.json`` and ``part-*.json`` markers beside the
parts) are still read; stages refuse to write into such a folder.
"""

from __future__ import annotations

import io
import posixpath
import re
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from scope_data.folder import Folder

META_DIR = ".scope"
MANIFEST = f"{META_DIR}/manifest.parquet"
LEGACY_MANIFEST = "_manifest.json"
RECORD_KEY = b"scope"


PART_RE = re.compile(r"part-\d{5}-of-\d{5}\.parquet")
"""A part file's name (top level of a table folder)."""
BOOKKEEPING_RE = re.compile(r"(?:part-\d{5}-of-\d{5}\.done|manifest|claim-[0-9a-f]{16})\.parquet")
"""A bookkeeping file's name (under `.scope/`)."""
TEMP_RE = re.compile(
    r"\.(?:part-\d{5}-of-\d{5}(?:\.done)?|manifest|claim-[0-9a-f]{16})\.parquet"
    r"\.[^./]+-\d+\.[0-9a-f]+\.tmp")
"""A temporary file of ours under `.scope/` (`Folder.open_atomic` names: `.<target>.<host>-<pid>.
<hex>.tmp` of one of the names above); the only files stale-temporary clean-up may delete."""


def claim_name(chash: str) -> str:
    """The claim of the writer of config hash `chash` (`scope_data.ownership`)."""
    return f"{META_DIR}/claim-{chash}.parquet"


def part_name(shard_index: int, num_shards: int) -> str:
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
    return f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


def marker_name(shard_index: int, num_shards: int) -> str:
    """The completion marker of part k of N."""
    return f"{META_DIR}/{part_name(shard_index, num_shards)[: -len('.parquet')]}.done.parquet"


def record_bytes(schema: pa.Schema, payload: bytes) -> bytes:
    """A zero-row Parquet file of `schema` whose footer carries `payload` (a JSON record)."""
    sink = io.BytesIO()
    pq.ParquetWriter(sink, schema.with_metadata({RECORD_KEY: payload})).close()
    return sink.getvalue()


def record_payload(data: bytes) -> bytes:
    """The payload of a bookkeeping file; ValueError when `data` is not one."""
    try:
        metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"not a Parquet file ({e})") from None
    if RECORD_KEY not in metadata:
        raise ValueError("a Parquet file without a scope record in its footer")
    return metadata[RECORD_KEY]


def reader_one_liners(url: str) -> dict[str, str]:
    """How to open the table at `url` with each common reader (the folder, no glob needed)."""
    return {
        "polars": f'pl.scan_parquet("{url}")',
        "pyarrow": f'pyarrow.dataset.dataset("{url}")',
        "datasets": f'datasets.load_dataset("parquet", data_dir="{url}")',
        "duckdb": f"duckdb.sql(\"select * from '{url}/*.parquet'\")",
    }


def unfinished_hint(folder: Folder) -> str:
    """" (k of N parts done; missing: part-...)" for a folder holding parts of an unfinished
    table, "" when it holds none."""

    def listing(name: str) -> set[str]:
        path = folder.path(name)
        if not folder.fs.exists(path):
            return set()
        return {posixpath.basename(p.rstrip("/")) for p in folder.fs.ls(path, detail=False)}

    names = listing("")
    done: dict[int, set[int]] = {}
    for name in listing(META_DIR):
        m = re.fullmatch(r"(part-(\d{5})-of-(\d{5}))\.done\.parquet", name)
        if m and m.group(1) + ".parquet" in names:
            done.setdefault(int(m.group(3)), set()).add(int(m.group(2)))
    if not done:
        parts = sum(n.endswith(".parquet") for n in names)
        return f" ({parts} unfinished part files present)" if parts else ""
    n, have = max(done.items(), key=lambda kv: len(kv[1]))
    missing = [part_name(k, n) for k in range(n) if k not in have]
    if not missing:
        return f" (all {n} parts done but not finalized: rerun the stage to write the manifest)"
    more = " ..." if len(missing) > 5 else ""
    return f" ({len(have)} of {n} parts done; missing: {', '.join(missing[:5])}{more})"
