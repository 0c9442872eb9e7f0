"""Prompt rendering shared by every stage that feeds a problem to a model (generate, correct).

`chat`: the problem is the single user message of the tokenizer's chat template, followed by the
generation prompt (the assistant header); the template supplies any BOS token, so the text is
tokenised without adding special tokens. `raw`: the problem text itself (base models), tokenised
with the tokenizer's usual special tokens (e.g. a BOS). The rendered text is stored in the
rollouts table as `prompt_text`, its ids as `prompt_token_ids`; later stages reuse those ids and
never re-render.
"""

from __future__ import annotations

from typing import Any

TEMPLATES = ("chat", "raw")


def render_prompt(tokenizer: Any, prompt: str, template: str = "chat") -> str:
    """The text a model sees for `prompt` under `template` ("chat" or "raw")."""
    if template == "raw":
        return prompt
    if template != "chat":
        raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the policy tokenizer has no chat template; use --template raw for a base model"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_prompt(tokenizer: Any, text: str, template: str = "chat") -> list[int]:
    """Token ids of a rendered prompt (special tokens added only for `raw`)."""
    return list(tokenizer(text, add_special_tokens=template == "raw", verbose=False)["input_ids"])


def render_and_encode(tokenizer: Any, prompts: list[str], template: str = "chat"
                      ) -> tuple[list[str], list[list[int]]]:
    """Rendered texts and their token ids for a batch of problem prompts."""
    texts = [render_prompt(tokenizer, p, template) for p in prompts]
    return texts, [encode_prompt(tokenizer, t, template) for t in texts]
