"""Benchmark of `scope train` (pipelines.training.train / pipelines.training.trainer).

1. Time per optimizer step of our Trainer vs a plain torch loop computing the same loss
   (same model init, same batches in the same order, same AdamW and grad clipping), measured in
   one run. Target: ratio <= 1.15.
2. Peak memory of the per-token log-prob + loss + backward with `selective_log_softmax` vs a
   naive full-vocabulary `log_softmax`: peak RSS growth (CPU, each variant in a fresh
   subprocess), bytes saved for backward, and `torch.cuda.max_memory_allocated` on a GPU.
3. With a GPU: tokens/s and an MFU estimate for a random-init Qwen2.5-0.5B-shaped model in bf16.

    python benchmarks/bench_train.py [--steps 12] [--threads 2] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Peak dense bf16 FLOP/s by device-name substring (vendor datasheets, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def build_model(out: Path, hidden: int, layers: int, vocab: int | None, seed: int = 0) -> Path:
    """Random-init Qwen2 + char tokenizer (vocab padded to `vocab` rows if given)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipelines.tiny.tokenizer import save_char_tokenizer

    tok = save_char_tokenizer(out, model_max_length=1024)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=max(vocab or 0, len(tok)), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(str(out))
    return out


def make_rows(n: int, resp_len: int, seed: int = 0):  # noqa: ANN201
    """Assembled training rows: n responses, a quarter of them with an off-policy suffix."""
    import numpy as np
    import polars as pl

    from scope_data.assembly import ROW_SCHEMA

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(resp_len // 2, resp_len + 1))
        start = length // 2 if i % 4 == 0 else length
        rows.append({
            "group_id": f"g{i // 8}", "problem_id": f"p{i // 8}", "round": 0,
            "rollout_id": f"r{i}", "kind": "corrected" if start < length else "policy",
            "source_rollout_id": None,
            "prompt_token_ids": rng.integers(5, 100, int(rng.integers(20, 40))).tolist(),
            "response_token_ids": rng.integers(5, 100, length).tolist(),
            "behaviour_logprobs": (-4.6 + 0.1 * rng.standard_normal(length)).tolist(),
            "off_policy_start": start, "reward": float(i % 2), "advantage": float(rng.normal()),
            "token_advantages": None,
        })
    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def bench_trainer(model_dir: Path, rows, steps: int, batch: int,  # noqa: ANN001
                  **kw: object) -> tuple[list[float], list[float]]:
    from transformers import TrainerCallback

    import pipelines.training.trainer as trainer_mod
    from pipelines.training.train import TrainConfig, fit

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            stamps.append(time.perf_counter())

        def on_train_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            stamps.append(time.perf_counter())

    original = trainer_mod.RichProgress
    trainer_mod.RichProgress = Clock  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as out:
            res = fit(TrainConfig(data="bench", policy=str(model_dir), output_dir=f"{out}/o",
                                  max_steps=steps, per_device_train_batch_size=batch,
                                  learning_rate=1e-5, max_length=4096, **kw), rows)
    finally:
        trainer_mod.RichProgress = original
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], res.metrics["loss"].to_list()


def bench_plain(model_dir: Path, rows, steps: int,  # noqa: ANN001
                batch: int) -> tuple[list[float], list[float]]:
    """The same loss, batches and optimizer in a hand-written torch loop."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pipelines.training.data import Collator, ResponseDataset, response_logprobs
    from pipelines.training.loss import mixed_policy_loss

    transformers.set_seed(0)
    rows = rows.sample(fraction=1.0, shuffle=True, seed=0)  # the order `fit` uses
    ds = ResponseDataset(rows, 4096)
    collate = Collator(ds, 0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [(step * batch + j) % len(ds) for j in range(batch)]
        b = collate([ds[i] for i in idx])
        logp, ent = response_logprobs(model, b, 1.0, with_entropy=True)
        loss, _ = mixed_policy_loss(logp, b["old_logp"], b["advantages"], b["response_mask"],
                                    b["off_mask"], max_length=4096, entropy=ent)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(variant: str, B: int, T: int, V: int) -> dict[str, float]:
    """One variant's log-probs + loss + backward on (B, T, V) logits: peak memory growth.

    CPU: resident memory sampled every millisecond by a thread (tensors this large are
    mmap-allocated, so freed memory leaves RSS at once); `saved_for_backward_mb` counts the
    distinct new storages autograd keeps (views of the logits excluded); GPU: peak allocated.
    """
    import threading

    import torch

    from pipelines.training.loss import mixed_policy_loss, selective_log_softmax

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(B, T, V, device=dev, requires_grad=True)
    idx = torch.randint(0, V, (B, T), device=dev)
    mask = torch.ones(B, T, device=dev)
    storages: dict[int, int] = {}
    own = logits.untyped_storage().data_ptr()

    def pack(t):  # noqa: ANN001, ANN202
        ptr = t.untyped_storage().data_ptr()
        if ptr != own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if variant == "selective":
            logp = selective_log_softmax(logits, idx, 1.0, chunk_rows=1)
        else:
            logp = torch.log_softmax(logits, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        loss, _ = mixed_policy_loss(logp, logp.detach(), torch.ones(B, device=dev), mask,
                                    torch.zeros(B, T, dtype=torch.bool, device=dev))
    saved = sum(storages.values())
    loss.backward()
    done.set()
    sampler.join()
    out = {"peak_rss_growth_mb": peak[0] - base, "saved_for_backward_mb": saved / 2**20}
    if cuda:
        out["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return out


def bench_gpu(steps: int) -> None:
    """Qwen2.5-0.5B-shaped random model in bf16: tokens/s and MFU of our trainer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipelines.tiny.tokenizer import save_char_tokenizer
    from pipelines.training.data import ResponseDataset

    name = torch.cuda.get_device_name()
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    batch = 16
    with tempfile.TemporaryDirectory() as tmp:
        model = Qwen2ForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        save_char_tokenizer(tmp)
        rows = make_rows(batch * steps, 1024)
        times, _ = bench_trainer(Path(tmp), rows, steps, batch, bf16=True)
        ds = ResponseDataset(rows.sample(fraction=1.0, shuffle=True, seed=0), 4096)
        tokens = sum(len(r.prompt) + len(r.response) for r in ds.rows)
    step = statistics.median(times[1:])
    tok_s = tokens / steps / step
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f"{6 * n_params * tok_s / peak:.1%}" if peak else "unknown (peak FLOP/s of device)"
    print(f"GPU {name}: {tok_s:,.0f} tokens/s (padded batches of {batch}), MFU ~{mfu} "
          f"(6*N*tokens/s, N={n_params / 1e9:.2f}B, bf16 peak {peak})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-child", default=None)
    ap.add_argument("--mem-shape", default="4,512,32768")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.mem_child:
        B, T, V = (int(x) for x in args.mem_shape.split(","))
        print(json.dumps(memory_child(args.mem_child, B, T, V)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch threads {args.threads}")
    plain_t: list[float] = []
    ours_t: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "m", hidden=args.hidden, layers=4, vocab=args.vocab)
        rows = make_rows(args.steps * args.batch, 128)
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            t, plain_l = bench_plain(model_dir, rows, args.steps, args.batch)
            plain_t += t[1:]  # first step of a run: allocator/threads warm-up
            t, ours_l = bench_trainer(model_dir, rows, args.steps, args.batch)
            ours_t += t[1:]
    for name, f in (("median", statistics.median), ("min", min)):
        print(f"step time ({name} of {len(ours_t)} steps): trainer {f(ours_t) * 1e3:.1f} ms, "
              f"plain torch loop {f(plain_t) * 1e3:.1f} ms, ratio {f(ours_t) / f(plain_t):.3f} "
              "(target <= 1.15)")
    diff = max(abs(a - b) for a, b in zip(ours_l, plain_l, strict=True))
    print(f"same losses (trainer vs plain loop): max |diff| = {diff:.2e}")
    B, T, V = (int(x) for x in args.mem_shape.split(","))
    print(f"memory of log-probs + loss + backward on ({B}, {T}, {V}) float32 logits "
          f"({B * T * V * 4 / 2**20:.0f} MB):")
    for variant in ("selective", "naive"):
        res = subprocess.run([sys.executable, __file__, "--mem-child", variant, "--mem-shape",
                              args.mem_shape, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        figures = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  {variant:9s} " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items()))
    if torch.cuda.is_available():
        bench_gpu(steps=8)
    else:
        print("no GPU in this run: tokens/s and MFU for the Qwen2.5-0.5B shape not measured")


if __name__ == "__main__":
    main()
