"""Cost of the table invariants checked when a stage reads its input (`scope_data.validate`)
vs the read every stage already does.

Writes a rollouts table of `--rows` rows (bench_shards' rows: 32 prompt and 256 response token
ids per row) in `--parts` parts, then times, best of `--repeat`, interleaved:

- ours: `check_table(manifest, vocab_size=...)` (ids unique and non-empty, rewards, token id
  ranges, problems within one part);
- baseline: `scan(url, check=False).collect()` (reading the table once, no checksums).

Prints both and the ratio ours / baseline (target: < 0.5, a check costs less than a read).

    .venv/bin/python benchmarks/bench_validate.py --rows 200000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_shards import GROUP, best_of, make_batch  # noqa: E402

from scope_data.shards import TableStore, read_manifest, scan  # noqa: E402
from scope_data.validate import check_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    per = -(-args.rows // args.parts // GROUP) * GROUP  # whole problems per part
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "rollouts")
        store = TableStore(url, "rollouts")
        for k in range(args.parts):
            with store.part_writer(k, args.parts, {}) as w:
                w.write(make_batch(k * per, min(per, args.rows - k * per), rng))
        manifest = store.finalize(args.parts, {})
        manifest = read_manifest(url)
        ours, base = best_of(args.repeat, lambda: check_table(manifest, vocab_size=152_064),
                             lambda: scan(url, check=False).collect(), "validate")
    print(f"rows {manifest.rows}, parts {args.parts}")
    print(f"check_table {ours:.3f} s   read (scan.collect) {base:.3f} s   "
          f"ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
