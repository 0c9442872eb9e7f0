"""Shared helpers of the engine/generate tests: a random-init tiny Qwen2 model folder and a
problems table. (The trained tiny policy of `pipelines.tiny.policy` is used where it is cached.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def build_random_tiny(out: Path, seed: int = 0, max_len: int = 256) -> Path:
    """A 2-layer Qwen2 (hidden 128, 4 heads of 32) with random weights + the char tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from pipelines.tiny.tokenizer import save_char_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out, model_max_length=max_len)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32,
        max_position_embeddings=max_len, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out))
    return out


def write_problems(url: str, n: int = 6, seed: int = 0, extra: list[dict] | None = None) -> None:
    """An arith problems table with `n` problems (+ `extra` rows) at `url`."""
    from scope_data.hashing import stable_id
    from scope_data.schema import SCHEMAS
    from scope_data.shards import TableStore
    from scope_data.tasks import arith

    rows = []
    for i, p in enumerate(arith.generate_problems(n, seed=seed, steps=(3, 4), modulus=10)):
        rows.append({"problem_id": stable_id("arith", i, p.prompt), "source": "arith",
                     "source_index": i, "task": "arith", "prompt": p.prompt,
                     "answer": p.answer, "solution": p.solution})
    rows += extra or []
    table = pa.Table.from_pylist(rows, schema=SCHEMAS["problems"])
    TableStore(url, "problems").write(table, {"test": True, "n": n, "seed": seed})
