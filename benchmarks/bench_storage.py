"""Shard store throughput: local disk vs an S3-compatible server on loopback, in one run.

Writes and reads the same rollouts table (rows from `bench_shards.make_batch`: full rollouts
schema, 256 response token ids per row) through `TableStore` on a local folder and on a moto S3
server started on 127.0.0.1, and prints rows/s of each and the ratio S3 / local.

    .venv/bin/python benchmarks/bench_storage.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_shards import make_batch  # noqa: E402

from scope_data.shards import TableStore, read_arrow, scan  # noqa: E402
from tests.s3_server import moto_server  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=25_000)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    per_part = -(-args.rows // args.parts)
    parts = [[make_batch(s, min(args.batch, min(args.rows, (k + 1) * per_part) - s), rng)
              for s in range(k * per_part, min(args.rows, (k + 1) * per_part), args.batch)]
             for k in range(args.parts)]
    config = {"bench": "storage", "rows": args.rows}
    local_url = tempfile.mkdtemp(prefix="bench_storage_")
    results = {}
    with moto_server("bench") as options:
        targets = {"local": (local_url, None),
                   "s3 (moto, loopback)": ("s3://bench/rollouts", options)}
        for name, (url, opts) in targets.items():
            def write(url=url, opts=opts) -> None:
                store = TableStore(url, "rollouts", opts)
                for k, batches in enumerate(parts):
                    with store.part_writer(k, args.parts, config) as w:
                        for b in batches:
                            w.write(b)
                store.finalize(args.parts, config)

            results[name] = (timed(write), timed(lambda url=url, opts=opts: read_arrow(url, opts)),
                             timed(lambda url=url, opts=opts: scan(url, opts).collect()))
            print(f"{name}: write {results[name][0]:.1f}s, read_arrow {results[name][1]:.1f}s, "
                  f"scan+collect {results[name][2]:.1f}s", flush=True)
    print(f"\n{args.rows:,} rollout rows, {args.parts} parts, cores: {os.cpu_count()}")
    print(f"{'operation':<16}{'local rows/s':>14}{'s3 rows/s':>14}{'s3/local':>10}")
    local, s3 = results["local"], results["s3 (moto, loopback)"]
    for i, op in enumerate(("write", "read_arrow", "scan+collect")):
        print(f"{op:<16}{args.rows / local[i]:>14,.0f}{args.rows / s3[i]:>14,.0f}"
              f"{local[i] / s3[i]:>10.2f}")


if __name__ == "__main__":
    main()
