"""The vLLM engine's own text decoding (`vllm_engine._decode`) on a byte-level BPE, built here:
new tokens decode as a `DecodeStream` stepped through the prompt token by token would, also
when the prompt (a teacher prefix) ends between the byte tokens of one character."""

from __future__ import annotations

import pytest

tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers.decoders import DecodeStream  # noqa: E402

from pipelines.engines.vllm_engine import _decode  # noqa: E402


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world wörld"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _stepped(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    stream = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream.step(tok, t)
    return "".join(stream.step(tok, t) or "" for t in ids)


@pytest.mark.parametrize("prompt_text, cut, new_text", [
    ("hello wörld", 0, " world"),      # the prompt ends on a whole character
    ("hello wörld", 1, "本 wörld"),    # ... inside 日 (1 of its 3 byte tokens in the prompt)
    ("hello wörld", 2, "本"),          # ... 2 of 3
    ("", 1, "本"),                     # a prompt of one partial character
])
def test_new_tokens_decode_without_the_prompt(byte_bpe, prompt_text, cut, new_text) -> None:
    ids = [] if not prompt_text else byte_bpe.encode(prompt_text).ids
    head = byte_bpe.encode("日").ids
    assert len(head) == 3  # one token per byte: 日 is E6 97 A5
    prompt = ids + head[:cut]
    new = head[cut:] + byte_bpe.encode(new_text).ids if cut else byte_bpe.encode(new_text).ids
    got = _decode(byte_bpe, prompt, new)
    assert got == _stepped(byte_bpe, prompt, new)
    assert got == ("日" if cut else "") + new_text
