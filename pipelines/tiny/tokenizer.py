"""Byte-level character tokenizer for the tiny-model kit (DESIGN.md section 6).

Every byte is one token (so an ASCII character is one token and nothing is ever unknown), after
five special tokens. The normaliser, pre-tokeniser and decoder are exactly those that
``transformers``' ``Qwen2Tokenizer`` rebuilds: transformers 5 loads any tokenizer stored next to
a ``qwen2`` model config as ``Qwen2Tokenizer``, ignoring ``tokenizer_class`` and the pipeline of
``tokenizer.json``, so a plain character vocabulary would silently lose spaces and newlines when
loaded with ``AutoTokenizer``. With the byte-level vocabulary both load paths (and vLLM, which
uses ``AutoTokenizer``) give the same ids, offsets and text.

The folder is a normal Hugging Face fast tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) whose chat template renders::

    <|user|>{prompt}\\n<|assistant|>{response}<|eos|>

with ``{% generation %}`` markers, so ``return_assistant_tokens_mask=True`` works too.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

PAD, EOS, USER, ASSISTANT, UNK = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|unk|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, USER, ASSISTANT, UNK)
CHARS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\r\x0b\x0c")
"""The printable characters of task text (each is one token)."""
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ m['content'] + '<|eos|>' }}{% endgeneration %}"
    "{%- else -%}{{ '<|user|>' + m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
# Qwen2Tokenizer's split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-symbol map, as a list indexed by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    symbols: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocab() -> dict[str, int]:
    """Token -> id: special tokens first (``<|pad|>`` = 0, ``<|eos|>`` = 1), then byte ``b`` at
    ``5 + b``."""
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *byte_symbols()])}


def build_char_tokenizer(model_max_length: int = 256) -> Any:
    """A ``PreTrainedTokenizerFast``: one token per byte (left padding, for generation)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab(), merges=[], unk_token=UNK))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=model_max_length,
    )


def save_char_tokenizer(out_dir: str | Path, model_max_length: int = 256) -> Any:
    """Build the tokenizer, save it as a HF tokenizer folder in ``out_dir`` and return it."""
    tok = build_char_tokenizer(model_max_length)
    tok.save_pretrained(str(out_dir))
    # transformers 5 writes its backend class name; the generic name also loads in 4.x
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return tok
