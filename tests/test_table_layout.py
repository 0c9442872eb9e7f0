"""The table folder layout (scope_data.layout): common readers open a finished table folder
directly, tables of the older layout are still read, and killed writers' temporary files go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from scope_data.folder import Folder
from scope_data.layout import LEGACY_MANIFEST, META_DIR, part_name
from scope_data.schema import SCHEMAS
from scope_data.shards import ShardError, TableStore, read_arrow, read_manifest
from tests.helpers_score import arith_rollout_rows, char_tokenizer_dir
from tests.helpers_tables import local_files

CONFIG = {"test": "layout"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[str, int]:
    """A scored-like rollouts table in 3 parts (nested lists, nulls), finalized."""
    root = tmp_path_factory.mktemp("layout")
    rows = arith_rollout_rows(char_tokenizer_dir(root / "tok"), n_problems=9)
    table = pa.Table.from_pylist(rows, schema=SCHEMAS["rollouts"])
    url = str(root / "rollouts")
    store = TableStore(url, "rollouts")
    for k in range(3):
        store.write_part(table.slice(12 * k, 12), k, 3, CONFIG)
    return url, store.finalize(3, CONFIG).rows


def test_readers_open_the_folder(finished: tuple[str, int], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, rows = finished
    assert rows == 36
    assert pl.scan_parquet(url).select(pl.len()).collect().item() == rows
    assert pl.read_parquet(url).height == rows
    assert ds.dataset(url).count_rows() == rows
    assert pq.read_table(url).num_rows == rows
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=url, split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == rows
    assert sorted(loaded["rollout_id"]) == sorted(read_arrow(url)["rollout_id"].to_pylist())


def test_duckdb_opens_the_folder(finished: tuple[str, int]) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (optional reader)")
    url, rows = finished
    assert duckdb.sql(f"select count(*) from '{url}/*.parquet'").fetchall() == [(rows,)]


def test_only_parts_beside_the_bookkeeping_folder(finished: tuple[str, int]) -> None:
    url, _ = finished
    names = local_files(url)
    assert [n for n in names if not n.startswith(f"{META_DIR}/")] == [
        part_name(k, 3) for k in range(3)]
    assert all(n.endswith(".parquet") for n in names)  # polars refuses mixed extensions


def legacy_table(url: str) -> pa.Table:
    """A table as an older scope wrote it: `_manifest.json` and JSON markers beside the part."""
    table = pa.Table.from_pylist(
        [{"problem_id": "p0", "source": "s", "source_index": 0, "task": "math", "prompt": "q",
          "answer": "1", "solution": None}], schema=SCHEMAS["problems"])
    os.makedirs(url)
    pq.write_table(table, f"{url}/{part_name(0, 1)}")
    part = Path(url, part_name(0, 1))
    entry = {"path": part.name, "rows": 1, "bytes": part.stat().st_size,
             "sha256": Folder(url).sha256(part.name)}
    Path(url, "part-00000-of-00001.json").write_text(json.dumps(entry))
    Path(url, LEGACY_MANIFEST).write_text(json.dumps({
        "table": "problems", "schema_version": 1, "files": [entry], "rows": 1,
        "config": {}, "config_hash": "0" * 16}))
    return table


def test_older_layout_is_read_but_not_written_into(tmp_path: Path) -> None:
    url = str(tmp_path / "old")
    table = legacy_table(url)
    assert read_manifest(url).rows == 1 and read_arrow(url).equals(table)
    with pytest.raises(ShardError, match="layout of an older scope.*write to a new folder"):
        TableStore(url, "problems").write(table, CONFIG)


def test_finalize_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    """A killed writer's temporary file would break `pl.scan_parquet(folder)`: finalize removes
    those of exited processes of this host, and those of other hosts once they are old."""
    url = str(tmp_path / "t")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname().replace(".", "_")
    meta = Path(url, META_DIR)
    meta.mkdir(parents=True)
    temp = {name: meta / f".{part_name(0, 1)}.{writer}.0a1b.tmp" for name, writer in [
        ("dead", f"{host}-{dead}"), ("alive", f"{host}-{os.getpid()}"),
        ("remote", f"elsewhere-{dead}"), ("remote_old", f"elsewhere-{os.getpid()}")]}
    for path in temp.values():
        path.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(temp["remote_old"], (old, old))
    TableStore(url, "problems").write(pa.Table.from_pylist([], schema=SCHEMAS["problems"]),
                                      CONFIG)
    assert {name for name, path in temp.items() if path.exists()} == {"alive", "remote"}
