"""Step-scoring throughput: hf-cls with length packing vs one sample at a time, and rule:arith.

hf-cls: a random-init Qwen2ForTokenClassification (``--layers``, ``--hidden``; char tokenizer +
``<extra_0>``, 4096-token context) scores the first ``--items`` ProcessBench GSM8K/MATH
solutions (real problem and step lengths; with the char tokenizer one token is one character,
so sequences are ~4x longer in tokens than with a BPE tokenizer), then 8x as many short arith
responses (the demo's PRM inputs). The same items are scored once
packed (``score_batch``, ``--batch-tokens`` budget) and once one at a time (``score`` per item),
in the same process; printed: steps/s, tokens/s and the ratio (target >= 3x). The scores of the
two runs are checked to agree.

rule:arith: steps/s over ``--rule-items`` fresh arith responses (target >= 50k steps/s).

    .venv/bin/python benchmarks/bench_score.py [--items 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def processbench_items(n: int) -> list[tuple[str, list[str]]]:
    items: list[tuple[str, list[str]]] = []
    for name in ("processbench.gsm8k.json", "processbench.math.json"):
        path = DATA / name
        if not path.is_file():
            sys.exit(f"{path} not found (the public test data folder, see its README)")
        items += [(r["problem"], r["steps"]) for r in json.loads(path.read_text())[: n // 2]]
    return items


def arith_items(n: int) -> list[tuple[str, list[str]]]:
    """Short inputs: the demo's arith responses (3-8 steps, ~150 tokens with the PRM format)."""
    from scope_data.tasks import arith

    problems = arith.generate_problems(n, seed=4242, steps=(3, 8))
    return [(p.prompt, arith.response_lines(p.solution)) for p in problems]


def bench_hf_cls(args: argparse.Namespace, data: str) -> None:
    import torch

    from pipelines.engines.base import load_prm
    from pipelines.tiny.prm import init_tiny_prm

    torch.set_num_threads(args.threads)
    items = processbench_items(args.items) if data == "processbench" else arith_items(
        8 * args.items)
    with tempfile.TemporaryDirectory() as tmp:
        model = init_tiny_prm(Path(tmp) / "cls", "cls", hidden_size=args.hidden,
                              num_layers=args.layers, num_heads=args.hidden // 32,
                              intermediate_size=4 * args.hidden, max_position_embeddings=4096)
        prm = load_prm(f"hf-cls:{model}", device="cpu", dtype="float32",
                       batch_tokens=args.batch_tokens)
        tokens = sum(len(prm.encode(p, s)[0]) for p, s in items)
        steps = sum(len(s) for _, s in items)
        prm.score_batch(items[:2])  # warm-up
        t0 = time.perf_counter()
        packed = prm.score_batch(items)
        t_packed = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [prm.score(p, s) for p, s in items]
        t_single = time.perf_counter() - t0
    diff = max(abs(a - b) for x, y in zip(packed, single, strict=True)
               for a, b in zip(x, y, strict=True))
    print(f"hf-cls ({args.layers} layers, hidden {args.hidden}, {args.threads} threads): "
          f"{len(items)} {data} solutions, {steps} steps, {tokens} tokens "
          f"(mean {tokens / len(items):.0f}), max |packed - single| = {diff:.1e}")
    print(f"  one at a time : {steps / t_single:8.1f} steps/s {tokens / t_single:10.0f} tokens/s")
    print(f"  length-packed : {steps / t_packed:8.1f} steps/s {tokens / t_packed:10.0f} tokens/s"
          f"  (batch_tokens {args.batch_tokens})")
    print(f"  speed-up      : {t_single / t_packed:.2f}x (target >= 3x)")


def bench_rule(args: argparse.Namespace) -> None:
    from pipelines.engines.base import load_prm
    from pipelines.tiny.prm import slipped_solution
    from scope_data.tasks import arith

    rng = random.Random(0)
    problems = arith.generate_problems(args.rule_items, seed=12345, steps=(3, 8))
    items = [(p.prompt, arith.response_lines(slipped_solution(p, rng) if rng.random() < 0.5
                                             else p.solution)) for p in problems]
    prm = load_prm("rule:arith")
    steps = sum(len(s) for _, s in items)
    t0, c0 = time.perf_counter(), time.process_time()
    prm.score_batch(items)  # cold: every prompt parsed for the first time
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    prm.score_batch(items)
    warm = time.perf_counter() - t0
    print(f"rule:arith: {len(items)} responses, {steps} steps: {steps / cold:,.0f} steps/s "
          f"wall ({steps / cold_cpu:,.0f} per CPU-second) with new prompts, "
          f"{steps / warm:,.0f} steps/s with prompts seen before; target >= 50,000")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--data", default="processbench,arith",
                    help="comma-separated: processbench (long inputs), arith (short inputs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rule-items", type=int, default=50_000)
    args = ap.parse_args()
    bench_rule(args)
    for data in args.data.split(","):
        bench_hf_cls(args, data)


if __name__ == "__main__":
    main()
