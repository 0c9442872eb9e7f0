"""Tests for the tiny-model kit (pipelines.tiny.policy, pipelines.tiny.tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.tiny import cache
from pipelines.tiny import policy as tiny
from pipelines.tiny.tokenizer import (
    CHARS,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    save_char_tokenizer,
)

PROMPT = "Mod 10. Start with 1. Subtract 7. Multiply by 7. Add 3."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder next to a qwen2 config, like a built model folder."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("tok")
    tok = save_char_tokenizer(folder)
    Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_tokenizer_is_fast_with_expected_specials(tok) -> None:
    assert tok.is_fast
    assert len(tok) == len(SPECIAL_TOKENS) + 256 == 261
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eos|>", 1)
    assert tok.padding_side == "left"
    # one token per character: byte b has id 5 + b
    assert tok("09 \n", add_special_tokens=False)["input_ids"] == [5 + 48, 5 + 57, 5 + 32, 5 + 10]


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="".join(CHARS), max_size=60).filter(
    lambda s: not any(special in s for special in SPECIAL_TOKENS)))  # markers are not text
def test_tokenizer_round_trip_and_offsets(tok, text: str) -> None:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == len(text)
    assert enc["offset_mapping"] == [(i, i + 1) for i in range(len(text))]
    assert tok.decode(enc["input_ids"]) == text


def test_auto_tokenizer_matches_built_tokenizer(tok) -> None:
    # transformers 5 loads a tokenizer beside a qwen2 config as Qwen2Tokenizer (byte-level
    # pipeline): the built tokenizer must behave identically, spaces and newlines included
    built = build_char_tokenizer()
    text = "<|user|>Mod 10. Start with 1.\n<|assistant|>1 - 7 = 4\n\tAnswer: 4  caf\u00e9<|eos|>"
    a = built(text, add_special_tokens=False, return_offsets_mapping=True)
    b = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
    assert tok.decode(b["input_ids"]) == text == built.decode(a["input_ids"])


def test_tokenizer_non_ascii_and_specials(tok) -> None:
    ids = tok("a\u00e9<|eos|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("a") and ids[-1] == tok.eos_token_id
    assert len(ids) == 4  # \u00e9 is two bytes, two tokens
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a\u00e9"


def test_chat_template(tok) -> None:
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert text == f"<|user|>{PROMPT}\n<|assistant|>"
    full = tok.apply_chat_template(
        [{"role": "user", "content": "Mod 10."}, {"role": "assistant", "content": "Answer: 1"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert tok.decode(full["input_ids"]) == "<|user|>Mod 10.\n<|assistant|>Answer: 1<|eos|>"
    # assistant mask covers the response and its <|eos|>, not the <|assistant|> header
    assert full["assistant_masks"] == [0] * 10 + [1] * 10


def test_cache_key_changes_with_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path))
    base = tiny.tiny_config()
    assert base == tiny.TinyConfig()
    assert tiny.tiny_config().hash() == base.hash()
    others = [
        tiny.tiny_config(error_rate=0.2),
        tiny.tiny_config(teacher=True),
        tiny.tiny_config(modulus=7),
        tiny.tiny_config(steps=(2, 4)),
        tiny.tiny_config(seed=1),
        tiny.tiny_config(max_steps=base.max_steps + 1),
        tiny.tiny_config(learning_rate=1e-3),
        tiny.tiny_config(train_min_steps=None),
    ]
    assert len({base.hash(), *(c.hash() for c in others)}) == len(others) + 1
    assert tiny.tiny_config(teacher=True).error_rate == 0.0
    assert tiny.tiny_config(teacher=True).max_steps == tiny.TEACHER_MAX_STEPS > base.max_steps
    assert tiny.tiny_config(teacher=True, max_steps=7).max_steps == 7
    assert tiny.tiny_cache_dir(base) == tmp_path / "tiny" / base.hash()


def _fake_build(calls: list[str]):
    def build(cfg, out, eval_problems, num_threads, verbose) -> None:
        calls.append(cfg.hash())
        (out / "weights.txt").write_text("w")
        (out / tiny.META_FILE).write_text(json.dumps({"config_hash": cfg.hash()}))

    return build


def test_build_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "none-shipped")
    calls: list[str] = []
    monkeypatch.setattr(tiny, "_build", _fake_build(calls))
    first = tiny.build_tiny_policy()
    assert first == tmp_path / "cache" / "tiny" / tiny.TinyConfig().hash()
    assert (first / "weights.txt").read_text() == "w"
    assert tiny.build_tiny_policy() == first and len(calls) == 1  # cache hit
    # out_dir: the cached build is copied, not retrained
    copied = tiny.build_tiny_policy(tmp_path / "copy")
    assert (copied / "weights.txt").is_file() and len(calls) == 1
    # another config builds again; force rebuilds
    tiny.build_tiny_policy(error_rate=0.1)
    tiny.build_tiny_policy(force=True)
    assert len(calls) == 3

    # a crashing build leaves neither the target folder nor a temporary one
    def crash(cfg, out, *args) -> None:
        (out / "half.bin").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "_build", crash)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.build_tiny_policy(seed=5)
    names = sorted(p.name for p in (tmp_path / "cache" / "tiny").iterdir())
    assert tiny.tiny_config(seed=5).hash() not in names
    assert not [n for n in names if ".tmp-" in n]
    # a temporary folder left by a killed build is cleared by the next build of that target
    key = tiny.tiny_config(seed=5).hash()
    stale = tmp_path / "cache" / "tiny" / f".{key}.tmp-killed"
    stale.mkdir()
    monkeypatch.setattr(tiny, "_build", _fake_build(calls))
    assert tiny.build_tiny_policy(seed=5).name == key and not stale.exists()


def test_shipped_builds_skip_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy and teacher ship prebuilt: an empty cache copies them, no training;
    a config the package does not ship (or force) still builds."""
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(tiny, "_build", _fake_build(calls))
    for teacher in (False, True):
        key = tiny.tiny_config(teacher=teacher).hash()
        shipped = cache.shipped_build(key)
        assert shipped is not None, f"default build {key} (teacher={teacher}) is not shipped"
        got = tiny.build_tiny_policy(teacher=teacher)
        assert got == tmp_path / "cache" / "tiny" / key
        for name in ("model.safetensors", "tokenizer.json", tiny.META_FILE):
            assert (got / name).read_bytes() == (shipped / name).read_bytes()
    assert calls == []
    tiny.build_tiny_policy(seed=9)
    tiny.build_tiny_policy(force=True)
    assert calls == [tiny.tiny_config(seed=9).hash(), tiny.TinyConfig().hash()]
    assert cache.shipped_build(tiny.tiny_config(seed=9).hash()) is None


def test_build_refuses_foreign_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "_build", _fake_build([]))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_policy(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_training_texts_error_share() -> None:
    cfg = tiny.TinyConfig(num_examples=2000)
    pairs = tiny.training_texts(cfg)
    assert pairs == tiny.training_texts(cfg)
    from scope_data.tasks.arith import first_error, parse_prompt

    wrong = sum(first_error(parse_prompt(p), c) != -1 for p, c in pairs)
    assert 0.26 < wrong / len(pairs) < 0.34
    # the curriculum: 1..6 operations by default, exactly steps with train_min_steps=None
    assert {len(parse_prompt(p).ops) for p, _ in pairs} == {1, 2, 3, 4, 5, 6}
    plain = tiny.training_texts(tiny.tiny_config(train_min_steps=None, num_examples=300))
    assert {len(parse_prompt(p).ops) for p, _ in plain} == {3, 4, 5, 6}
    clean = tiny.training_texts(tiny.tiny_config(teacher=True, num_examples=500))
    assert all(first_error(parse_prompt(p), c) == -1 for p, c in clean)


@pytest.mark.slow
def test_tiny_policy_loads(tiny_policy: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy))
    tok = AutoTokenizer.from_pretrained(str(tiny_policy))
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 128, 4)
    assert cfg.head_dim == 32 and cfg.vocab_size == len(tok)
    assert tok.is_fast and tok.eos_token_id == model.generation_config.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text + "1 - 7 = 4\nAnswer: 4", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text + "1 - 7 = 4\nAnswer: 4"  # spaces and newlines survive
    assert (tiny_policy / "model.safetensors").is_file()
    meta = tiny.load_meta(tiny_policy)
    assert meta["config_hash"] == tiny.TinyConfig().hash()


@pytest.mark.slow
def test_tiny_policy_mix_requirement(tiny_policy: Path) -> None:
    mix = tiny.evaluate_mix(tiny_policy, n_problems=256, seed=1)
    assert mix["n"] == 256
    assert 0.2 <= mix["correct_share"] <= 0.7
    assert mix["non_step0_share"] > 0.5
    assert sum(mix["first_error_hist"].values()) == mix["failed"]
    recorded = tiny.load_meta(tiny_policy)["mix"]
    assert 0.2 <= recorded["correct_share"] <= 0.7 and recorded["non_step0_share"] > 0.5


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "known regression (2026-11-30): with transformers 5.19 / trl 1.16 the clean-data teacher "
    "recipe (2400 steps) reaches loss 0.055 but only 30% correct at T=1, below the policy's 53% "
    "(it was 100% in earlier sessions); issue 15 ships built checkpoints"))
def test_tiny_teacher_is_clean_and_better(tiny_teacher: Path, tiny_policy: Path) -> None:
    meta = tiny.load_meta(tiny_teacher)
    assert meta["config"]["error_rate"] == 0.0
    assert meta["mix"]["correct_share"] > tiny.load_meta(tiny_policy)["mix"]["correct_share"]


def test_study_models_ship_prebuilt() -> None:
    """The default countdown policy, the learned countdown PRM and the arith tiny PRM (the
    models `scope study` uses) ship prebuilt, under the hashes of their default configs."""
    from pipelines.tiny.countdown import CountdownTinyConfig
    from pipelines.tiny.countdown_prm import CountdownPRMConfig
    from pipelines.tiny.prm import TinyPRMConfig

    for cfg in (CountdownTinyConfig(), CountdownPRMConfig(), TinyPRMConfig()):
        assert cache.shipped_build(cfg.hash()) is not None, f"{type(cfg).__name__} not shipped"
