"""Character-level fast tokenizer for the tiny-model kit (DESIGN.md section 6).

Every printable ASCII character (plus ``\\t`` and ``\\n``) is one token; anything else maps to
``<|unk|>``. The tokenizer is a normal Hugging Face fast tokenizer folder (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``): offsets mapping works, decoding joins
characters without spaces, and the chat template renders::

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
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ m['content'] + '<|eos|>' }}{% endgeneration %}"
    "{%- else -%}{{ '<|user|>' + m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def vocab() -> dict[str, int]:
    """Token -> id: special tokens first (``<|pad|>`` = 0, ``<|eos|>`` = 1), then characters."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}


def build_char_tokenizer(model_max_length: int = 256) -> Any:
    """A ``PreTrainedTokenizerFast`` over single characters (left padding, for generation)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab(), merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
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
    # transformers 5 writes its own class name; the generic one also loads in transformers 4.x
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return tok
