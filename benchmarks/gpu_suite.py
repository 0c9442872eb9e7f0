"""GPU suite for a lent GPU machine (issue 12, item 6): prints ONE JSON object.

1. `train_step`: one optimizer step (forward, backward, grad clip 1.0, AdamW) of `scope train`'s
   loss path (`pipelines.training.data.response_logprobs` with the entropy the trainer always
   computes, then `mixed_policy_loss`, token_mean) vs a plain Hugging Face causal-LM step
   (`model(input_ids, attention_mask, labels)`, prompt labels -100) on the same batch: a
   random-init Qwen2.5-0.5B-shaped `Qwen2ForCausalLM` (published dims, tied embeddings),
   B=8 x T=1024 (128 prompt + 896 response tokens, a quarter of the rows with an off-policy
   suffix), fp32 weights under bf16 autocast as `scope train --bf16`. Reported as tokens/s and
   as a share of the measured bf16 matmul ceiling (`matmul_ceiling`: best TFLOP/s of square
   bf16 matmuls), with model FLOPs per token = 6 * params + 12 * layers * T * heads * head_dim
   (PaLM's convention: 2 forward + 4 backward FLOPs per parameter, plus the attention scores and
   values at full, non-causal length; the tied embedding counts once, as the LM head).
   Targets: >= 1.0x the plain step and >= 45% of the ceiling.
2. `logprobs`: peak memory growth and time of forward + backward of per-token log-probs on the
   same (8, 1024, 151936) bf16 logits: `selective_log_softmax` (chunk_rows 4, the trainer's
   default, and 1) vs `log_softmax(logits.float()).gather` (float32 like ours). The growth
   includes the logits' gradient, which both need. Target: <= 1/4 of the memory at <= 1.5x
   the time.
3. `prm_packing`: `hf-cls` PRM scoring (`pipelines.engines.prm_hf`) of items with mixed
   lengths (2-16 steps of ~20-600 characters, one token per character, <= 3800 characters),
   length-packed `score_batch` (engine default batch_tokens 8192, and 32768) vs one `score`
   call per item, on a random-init 0.5B-shaped `Qwen2ForTokenClassification` (built by
   `pipelines.tiny.prm.init_tiny_prm`, so 14 key-value heads) in bf16. Target: >= 3x.

CUDA timings synchronise before and after every timed call and skip warm-up iterations; peak
memory is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory
allocated before. Without a CUDA device (or with `--cpu`) the same measurements run at tiny
shapes in float32 in well under a minute (memory: peak resident set growth of a child process
per variant), so CI smoke-tests the script; `"device": "cpu"` says so.

Imports stay within the GPU image (torch, transformers, accelerate, peft): the only other
package our modules name is polars, for a type annotation in `pipelines.training.data`; a
placeholder module stands in for it when it is absent.

    python benchmarks/gpu_suite.py [--cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2.5-0.5B's published config (hidden 896, 24 layers, 14 query / 2 key-value heads).
QWEN05 = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
          "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2}
TINY = {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
SHAPES = {  # per device: model, batch, prompt/response lengths, timing iterations, PRM items
    "cuda": {"model": QWEN05, "B": 8, "P": 128, "R": 896, "warmup": 3, "iters": 10,
             "matmul_n": (8192, 16384), "logprob_shape": (8, 1024, 151936), "prm_items": 384,
             "prm_chars": 3800,
             "prm": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "head_dim": 64,
                     "intermediate_size": 4864}, "batch_tokens": (8192, 32768)},
    "cpu": {"model": TINY, "B": 2, "P": 16, "R": 48, "warmup": 1, "iters": 3,
            "matmul_n": (256,), "logprob_shape": (4, 64, 8192), "prm_items": 24, "prm_chars": 1200,
            "prm": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "head_dim": 32,
                    "intermediate_size": 128}, "batch_tokens": (8192,)},
}
TARGETS = {"train_speedup_vs_plain": 1.0, "train_share_of_ceiling": 0.45,
           "logprobs_memory_ratio": 0.25, "logprobs_time_ratio": 1.5, "prm_packing_speedup": 3.0}


def training_data() -> types.ModuleType:
    """`pipelines.training.data`, importable where polars is absent (it names polars only in a
    type annotation, so an empty placeholder module is enough)."""
    try:
        import polars  # noqa: F401
    except ImportError:
        sys.modules["polars"] = types.ModuleType("polars")
    import pipelines.training.data as data

    return data


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], dev: str, warmup: int, iters: int) -> float:
    """Median wall seconds of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(dev: str) -> None:
    import torch

    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def matmul_ceiling(dev: str, sh: dict[str, Any]) -> dict[str, Any]:
    """Best achieved TFLOP/s (2 n^3 per product) of square matmuls, bf16 on CUDA, fp32 on CPU."""
    import torch

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    best = 0.0
    for n in sh["matmul_n"]:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev,
                                                                        dtype=dtype)
        sec = timed(lambda a=a, b=b: a @ b, dev, sh["warmup"], sh["iters"])
        best = max(best, 2 * n**3 / sec / 1e12)
    return {"dtype": str(dtype).removeprefix("torch."), "sizes": list(sh["matmul_n"]),
            "tflops": best}


def train_batch(sh: dict[str, Any], vocab: int, dev: str) -> dict[str, Any]:
    """A `Collator`-layout batch without padding: P prompt + R response tokens per row."""
    import torch

    g = torch.Generator().manual_seed(0)
    B, P, R = sh["B"], sh["P"], sh["R"]
    ids = torch.randint(0, vocab, (B, P + R), generator=g)
    off = torch.zeros(B, R, dtype=torch.bool)
    off[::4, R // 2 :] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(P + R).expand(B, -1).contiguous(),
             "response_mask": torch.ones(B, R), "off_mask": off,
             "advantages": torch.randn(B, generator=g)[:, None].expand(B, R).contiguous()}
    return {k: v.to(dev) for k, v in batch.items()}


def bench_train(dev: str, sh: dict[str, Any], ceiling_tflops: float) -> dict[str, Any]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipelines.training.loss import mixed_policy_loss

    data = training_data()
    torch.manual_seed(0)
    cfg = Qwen2Config(**sh["model"], tie_word_embeddings=True, max_position_embeddings=32768)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev == "cuda")
    batch = train_batch(sh, cfg.vocab_size, dev)
    labels = batch["input_ids"].clone()
    labels[:, : sh["P"]] = -100
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    with torch.no_grad(), amp:  # round-start log-probs: ratios near 1 as in a real round
        batch["old_logp"], _ = data.response_logprobs(model, batch)

    def step(loss_fn: Callable[[], Any]) -> None:
        with amp:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours() -> Any:
        logp, ent = data.response_logprobs(model, batch, with_entropy=True)
        return mixed_policy_loss(logp, batch["old_logp"], batch["advantages"],
                                 batch["response_mask"], batch["off_mask"], entropy=ent)[0]

    def plain() -> Any:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=labels).loss

    n_params = sum(p.numel() for p in model.parameters())
    T = sh["P"] + sh["R"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    flops_tok = 6 * n_params + 12 * cfg.num_hidden_layers * T * cfg.num_attention_heads * head_dim
    out: dict[str, Any] = {
        "model": "Qwen2.5-0.5B shape" if sh["model"] is QWEN05 else "tiny Qwen2",
        "params": n_params, "batch": sh["B"], "seq_len": T, "prompt_len": sh["P"],
        "precision": "bf16 autocast" if dev == "cuda" else "fp32",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "flops_per_token": flops_tok,
    }
    for name, fn in (("plain_hf", plain), ("scope_loss", ours)):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(lambda fn=fn: step(fn), dev, sh["warmup"], sh["iters"])
        tok_s = sh["B"] * T / sec
        out[name] = {"step_s": sec, "tokens_per_s": tok_s,
                     "share_of_ceiling": tok_s * flops_tok / (ceiling_tflops * 1e12)}
        if dev == "cuda":
            out[name]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["speedup_vs_plain"] = out["scope_loss"]["tokens_per_s"] / out["plain_hf"]["tokens_per_s"]
    out["meets_targets"] = (
        out["speedup_vs_plain"] >= TARGETS["train_speedup_vs_plain"]
        and out["scope_loss"]["share_of_ceiling"] >= TARGETS["train_share_of_ceiling"])
    return out


def logprob_inputs(shape: tuple[int, int, int], dev: str) -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    B, T, V = shape
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    logits = torch.randn(B, T, V, device=dev, dtype=dtype, requires_grad=True)
    return logits, torch.randint(0, V, (B, T), device=dev), torch.randn(B, T, device=dev)


def logprob_fn(variant: str, logits: Any, index: Any, weights: Any) -> Callable[[], Any]:
    """Forward + backward of one variant ("full" or "chunked<rows>"); returns the log-probs."""
    import torch

    from pipelines.training.loss import selective_log_softmax

    def run() -> Any:
        logits.grad = None
        if variant == "full":
            lp = torch.log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]
        else:
            lp = selective_log_softmax(logits, index, 1.0, int(variant.removeprefix("chunked")))
        (lp * weights).sum().backward()
        return lp.detach()

    return run


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(variant: str, shape: tuple[int, int, int]) -> float:
    """CPU: peak resident-set growth (MB) of one forward + backward, after a warm-up call, in
    this fresh process (started with MALLOC_MMAP_THRESHOLD_ so freed tensors leave the resident
    set at once)."""
    logits, index, weights = logprob_inputs(shape, "cpu")
    fn = logprob_fn(variant, logits, index, weights)
    fn()
    logits.grad = None
    try:  # reset the high-water mark to the current resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def bench_logprobs(dev: str, sh: dict[str, Any]) -> dict[str, Any]:
    import torch

    shape = sh["logprob_shape"]
    variants = ("full", "chunked4", "chunked1")
    logits, index, weights = logprob_inputs(shape, dev)
    res: dict[str, Any] = {}
    lps = {}
    for v in variants:
        fn = logprob_fn(v, logits, index, weights)
        sec = timed(fn, dev, sh["warmup"], sh["iters"])
        if dev == "cuda":
            logits.grad = None
            free(dev)
            sync(dev)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            lps[v] = fn()
            sync(dev)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            lps[v] = fn()
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            cmd = [sys.executable, __file__, "--mem-child", v, "--shape",
                   ",".join(map(str, shape))]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            peak = json.loads(proc.stdout)["peak_mb"]
        res[v] = {"time_s": sec, "peak_mb": peak}
    for v in variants[1:]:
        res[v]["memory_ratio"] = res[v]["peak_mb"] / res["full"]["peak_mb"]
        res[v]["time_ratio"] = res[v]["time_s"] / res["full"]["time_s"]
        res[v]["meets_targets"] = (res[v]["memory_ratio"] <= TARGETS["logprobs_memory_ratio"]
                                   and res[v]["time_ratio"] <= TARGETS["logprobs_time_ratio"])
    diff = max((lps[v].float() - lps["full"].float()).abs().max().item() for v in variants[1:])
    return {"shape": list(shape), "dtype": "bfloat16" if dev == "cuda" else "float32",
            **res, "max_abs_diff": diff}


def prm_items(n: int, max_chars: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Problems of 60-400 characters with 2-16 steps of ~20-600 (log-normal around 150),
    trailing steps dropped until the item has at most `max_chars` characters."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits + "     +-=*()."

    def text(k: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(k)).strip() or "x"

    items = []
    for _ in range(n):
        problem = text(rng.randint(60, 400))
        steps = [text(min(600, max(20, int(rng.lognormvariate(math.log(150), 0.6)))))
                 for _ in range(rng.randint(2, 16))]
        while len(steps) > 1 and len(problem) + sum(map(len, steps)) > max_chars:
            steps.pop()
        items.append((problem, steps))
    return items


def bench_prm(dev: str, sh: dict[str, Any]) -> dict[str, Any]:
    from pipelines.engines.base import load_prm
    from pipelines.tiny.prm import init_tiny_prm

    items = prm_items(sh["prm_items"], sh["prm_chars"])
    out: dict[str, Any] = {
        "model": "0.5B-shaped (14 kv heads)" if dev == "cuda" else "tiny", "items": len(items),
        "steps": sum(len(s) for _, s in items)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = init_tiny_prm(Path(tmp) / "cls", "cls", max_position_embeddings=4096,
                               **sh["prm"])
        for bt in sh["batch_tokens"]:
            prm = load_prm(f"hf-cls:{folder}", device=dev, dtype="auto", batch_tokens=bt)
            if "tokens" not in out:
                out["tokens"] = sum(len(prm.encode(p, s)[0]) for p, s in items)
                out["dtype"] = str(prm.torch_dtype).removeprefix("torch.")
                prm.score_batch(items[:8])  # warm-up
                for p, s in items[:2]:
                    prm.score(p, s)
                sync(dev)
                t0 = time.perf_counter()
                single = [prm.score(p, s) for p, s in items]
                sync(dev)
                out["single_s"] = time.perf_counter() - t0
                out["single_tokens_per_s"] = out["tokens"] / out["single_s"]
            sync(dev)
            t0 = time.perf_counter()
            packed = prm.score_batch(items)
            sync(dev)
            sec = time.perf_counter() - t0
            diff = max((abs(a - b) for x, y in zip(packed, single, strict=True)
                        for a, b in zip(x, y, strict=True) if a == a and b == b), default=0.0)
            out[f"packed_{bt}"] = {"batch_tokens": bt, "packed_s": sec,
                                   "tokens_per_s": out["tokens"] / sec,
                                   "speedup": out["single_s"] / sec, "max_abs_diff": diff}
            del prm
            free(dev)
    out["speedup"] = max(out[f"packed_{bt}"]["speedup"] for bt in sh["batch_tokens"])
    out["meets_target"] = out["speedup"] >= TARGETS["prm_packing_speedup"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU fallback even with CUDA")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.mem_child:
        torch.set_num_threads(args.threads)
        shape = tuple(int(x) for x in args.shape.split(","))
        print(json.dumps({"peak_mb": memory_child(args.mem_child, shape)}))
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    sh = SHAPES[dev]
    result: dict[str, Any] = {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "targets": TARGETS,
    }
    result["matmul_ceiling"] = matmul_ceiling(dev, sh)
    ceiling = result["matmul_ceiling"]["tflops"]
    for key, section in (("train_step", lambda: bench_train(dev, sh, ceiling)),
                         ("logprobs", lambda: bench_logprobs(dev, sh)),
                         ("prm_packing", lambda: bench_prm(dev, sh))):
        result[key] = section()
        free(dev)  # the section's tensors went out of scope with it
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
