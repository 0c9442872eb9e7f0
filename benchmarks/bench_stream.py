"""Streaming a large shard through a stage: peak memory and throughput of `scope score`.

Builds a synthetic rollouts table of `--rows` arith rollouts (8 per problem: canonical and
slipped solutions, 3-8 steps; char-tokenizer token ids, so the policy tokenizer re-encodes them
exactly) in ONE part, written batch by batch through `TableStore.part_writer`, then runs

    scope score --rollouts ROLLOUTS --out SCORED --prm rule:arith --tokenizer TOK

in a fresh process and prints its peak RSS (VmHWM of that process) and rows/s (rows of the table
over the seconds of the command, imports excluded). Target: peak RSS < 1.5 GB at 1,000,000 rows,
which holds only if the shard streams through the stage in bounded batches.

    .venv/bin/python benchmarks/bench_stream.py [--rows 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.tiny.prm import slipped_solution  # noqa: E402
from pipelines.tiny.tokenizer import save_char_tokenizer  # noqa: E402
from scope_data.hashing import stable_id  # noqa: E402
from scope_data.schema import schema_for  # noqa: E402
from scope_data.shards import TableStore  # noqa: E402
from scope_data.tasks import arith  # noqa: E402

GROUP = 8  # responses per problem
EOS = 1  # the char tokenizer: <|eos|> = 1, byte b = 5 + b


def token_lists(texts: list[str], eos: bool) -> pa.Array:
    """The char tokenizer's ids of each text (one token a byte), EOS appended if `eos`."""
    raw = [t.encode() for t in texts]
    lens = np.array([len(b) for b in raw], dtype=np.int64)
    ids = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.int32) + 5
    if eos:
        ids = np.insert(ids, np.cumsum(lens), EOS)
        lens += 1
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))


def make_batch(problems: list[arith.ArithProblem], first: int, policy: str,
               rng: random.Random) -> pa.Table:
    """GROUP rollouts of each problem (problem index from `first`), in problem order."""
    cols: dict[str, list] = {k: [] for k in (
        "problem_id", "source_index", "prompt", "answer", "solution", "rollout_id",
        "sample_idx", "response_text", "pred_answer", "correct")}
    for j, p in enumerate(problems):
        index = first + j
        pid = stable_id("arith", index, p.prompt)
        for s in range(GROUP):
            text = p.solution if rng.random() < 0.3 else slipped_solution(p, rng)
            ok = arith.is_correct(p, text)
            for key, value in (("problem_id", pid), ("source_index", index),
                               ("prompt", p.prompt), ("answer", p.answer),
                               ("solution", p.solution), ("rollout_id", stable_id(pid, 0, s)),
                               ("sample_idx", s), ("response_text", text),
                               ("pred_answer", arith.extract_answer(text)), ("correct", ok)):
                cols[key].append(value)
    n = len(cols["problem_id"])
    response_ids = token_lists(cols["response_text"], eos=True)
    logprobs = pa.ListArray.from_arrays(
        response_ids.offsets, pa.array(np.full(len(response_ids.values), -0.5, np.float32)))
    correct = np.array(cols["correct"])
    return pa.table({
        **{k: cols[k] for k in ("problem_id", "source_index", "prompt", "answer", "solution")},
        "source": ["arith"] * n, "task": ["arith"] * n,
        "rollout_id": cols["rollout_id"], "round": np.zeros(n, np.int32),
        "sample_idx": np.array(cols["sample_idx"], np.int32), "policy": [policy] * n,
        "prompt_text": cols["prompt"], "prompt_token_ids": token_lists(cols["prompt"], eos=False),
        "response_text": cols["response_text"], "response_token_ids": response_ids,
        "behaviour_logprobs": logprobs, "finish_reason": ["stop"] * n,
        "temperature": np.ones(n, np.float32), "top_p": np.ones(n, np.float32),
        "seed": np.arange(n, dtype=np.int64), "pred_answer": cols["pred_answer"],
        "reward": correct.astype(np.float32), "correct": correct, "status": ["ok"] * n,
    }).select(schema_for("rollouts").names)


def build(url: str, rows: int, tok_dir: Path, batch_problems: int = 4096) -> None:
    n_problems = -(-rows // GROUP)
    problems = arith.generate_problems(n_problems, seed=2026, steps=(3, 8))
    rng = random.Random(0)
    config = {"bench": "stream", "rows": rows}
    store = TableStore(url, "rollouts")
    with store.part_writer(0, 1, config) as w:
        for lo in range(0, n_problems, batch_problems):
            batch = make_batch(problems[lo : lo + batch_problems], lo, f"hf:{tok_dir}", rng)
            w.write(batch.slice(0, max(0, rows - lo * GROUP)))
    store.finalize(1, config)


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from cli.main import app

def hwm_kb():  # peak RSS of this process (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

t0 = time.perf_counter()
try:
    app({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_kb": hwm_kb(), "code": code}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_stream_"))
    root.mkdir(parents=True, exist_ok=True)
    tok_dir, rollouts, scored = root / "tok", str(root / "rollouts"), str(root / "scored")
    save_char_tokenizer(tok_dir)

    t0 = time.perf_counter()
    build(rollouts, args.rows, tok_dir)
    size = sum(p.stat().st_size for p in Path(rollouts).glob("*.parquet"))
    print(f"built {args.rows:,} rollouts in one part ({size / 1e6:.0f} MB of Parquet) in "
          f"{time.perf_counter() - t0:.0f}s")

    argv = ["score", "--rollouts", rollouts, "--out", scored, "--prm", "rule:arith",
            "--tokenizer", str(tok_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.exit(f"scope score failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    if run["code"] not in (0, None):
        sys.exit(f"scope score exited {run['code']}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    peak_gb = run["peak_rss_kb"] * 1024 / 1e9
    print(f"scope score --prm rule:arith: {args.rows:,} rows in {run['seconds']:.1f}s "
          f"({args.rows / run['seconds']:,.0f} rows/s; {wall:.1f}s with start-up), "
          f"peak RSS {peak_gb:.2f} GB; target < 1.5 GB {'ok' if peak_gb < 1.5 else 'MISSED'}")
    print(json.dumps({"rows": args.rows, "seconds": run["seconds"], "wall_s": wall,
                      "rows_per_s": args.rows / run["seconds"], "peak_rss_gb": peak_gb}))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
