"""The architecture of the tiny Qwen2 models: one size record shared by every tiny build config
(policy and PRM, arith and countdown) and the one place a `Qwen2Config` is made from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    """Layers and widths of a tiny Qwen2 (fields of every tiny build config, so in its hash)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512


def qwen2_config(tok: Any, size: ModelSize, max_position_embeddings: int) -> Any:
    """A `Qwen2Config` of `size` for the tokenizer `tok` (tied embeddings, no BOS, as many
    key/value heads as query heads)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tok), hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size, num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads, num_key_value_heads=size.num_heads,
        head_dim=size.head_dim, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
