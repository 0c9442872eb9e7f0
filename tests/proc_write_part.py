"""Child process of tests/test_crash_safety.py: write a big table through the shard store.

    python tests/proc_write_part.py URL ROWS NUM_SHARDS [SHARD_INDEX]

Writes the rows of `big_table(ROWS)` owned by each shard (or only SHARD_INDEX) in batches of
BATCH rows through `TableStore.part_writer`, then finalizes when every part exists.
Storage options come from $SCOPE_STORAGE_OPTIONS (JSON). Deterministic: the same arguments
always write byte-identical parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import pyarrow as pa

BATCH = 20_000
PAUSE_S = 0.02  # after each batch: a kill a few ms after a progress line lands inside the part
# even where writing the rest of it takes less than the killer's delay


def big_table(rows: int) -> pa.Table:
    """A problems table with long prompts (~250 bytes a row), deterministic."""
    from scope_data.schema import SCHEMAS

    filler = "Mod 10. Start with 3. Add 7. Multiply by 9. Subtract 4. " * 4
    return pa.table({
        "problem_id": [f"p{i:08d}" for i in range(rows)],
        "source": ["big"] * rows,
        "source_index": list(range(rows)),
        "task": ["arith"] * rows,
        "prompt": [f"{filler}#{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(rows)],
        "answer": [str(i % 10) for i in range(rows)],
        "solution": [None] * rows,
    }, schema=SCHEMAS["problems"])


def shard_rows(table: pa.Table, k: int, num_shards: int) -> pa.Table:
    size = -(-table.num_rows // num_shards)
    return table.slice(k * size, size)


def main() -> None:
    from scope_data.shards import TableStore

    url, rows, num_shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    only = int(sys.argv[4]) if len(sys.argv) > 4 else None
    options = json.loads(os.environ.get("SCOPE_STORAGE_OPTIONS") or "null")
    config = {"rows": rows, "num_shards": num_shards}
    store = TableStore(url, "problems", options)
    table = big_table(rows)
    for k in range(num_shards) if only is None else [only]:
        if store.part_done(k, num_shards, config):
            continue
        part = shard_rows(table, k, num_shards)
        with store.part_writer(k, num_shards, config, {"status": {"ok": part.num_rows}}) as w:
            for start in range(0, part.num_rows, BATCH):
                w.write(part.slice(start, BATCH))
                print(f"part {k} batch {start // BATCH}", flush=True)
                time.sleep(PAUSE_S)
    if not store.missing_parts(num_shards, config):
        store.finalize(num_shards, config)
        print("finalized", flush=True)


if __name__ == "__main__":
    main()
