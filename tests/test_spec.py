"""Engine specs: one resolver (model path, tokenizer path, trainable) and one tokenizer loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.engines.spec import (
    ResolvedModel,
    SpecError,
    load_tokenizer,
    local_model_path,
    parse_model,
    parse_spec,
    policy_tokenizer_path,
    resolve,
    trainable_path,
    trained_spec,
)


@pytest.mark.parametrize("spec,role,tokenizer,expected", [
    ("hf:/m/policy", "generation", None, ("/m/policy", "/m/policy", True)),
    ("vllm:org/model", "generation", None, ("org/model", "org/model", True)),
    ("hf:/m/policy", "generation", "/tok", ("/m/policy", "/tok", True)),
    ("openai:http://h:8000/v1#served", "generation", None, (None, "served", False)),
    ("openai:http://h:8000/v1#served", "generation", "/tok", (None, "/tok", False)),
    ("hf:/m/teacher", "teacher", None, ("/m/teacher", "/m/teacher", True)),
    ("oracle:arith", "teacher", None, (None, None, False)),
    ("reference", "teacher", None, (None, None, False)),
    ("rule:arith", "prm", None, (None, None, False)),
    ("hf-cls:/m/prm", "prm", None, ("/m/prm", "/m/prm", False)),
    ("hf-tag:/m/prm", "prm", None, ("/m/prm", "/m/prm", False)),
    ("vllm:/m/prm", "prm", None, ("/m/prm", "/m/prm", False)),
])
def test_resolve_every_spec_form(spec, role, tokenizer, expected) -> None:
    assert resolve(parse_spec(spec, role), tokenizer) == ResolvedModel(*expected)


def test_parse_model_reads_bare_paths_as_hf() -> None:
    assert str(parse_model("/models/p")) == "hf:/models/p"
    assert str(parse_model("org/name")) == "hf:org/name"
    assert parse_model("hf-cls:/x").role == "prm"
    assert parse_model("reference").kind == "reference"
    with pytest.raises(SpecError, match="openai:<base_url>#<model>"):
        parse_model("openai:http://h/v1")


def test_trainable_paths_and_trained_specs() -> None:
    assert trainable_path("hf:/m/p") == "/m/p"
    assert trainable_path("vllm:/m/p") == "/m/p"
    assert trainable_path("/m/p") == "/m/p"  # a bare folder
    for spec in ("rule:arith", "oracle:arith", "reference", "openai:http://h/v1#m", "hf-cls:/x",
                 "hf-tag:/x"):
        with pytest.raises(ValueError, match="no trainable weights"):
            trainable_path(spec)
    assert trained_spec("vllm:/m/p", "/run/train") == "vllm:/run/train"
    assert trained_spec("hf:/m/p", "/run/train") == "hf:/run/train"
    assert trained_spec("/m/p", "/run/train") == "hf:/run/train"


def test_policy_tokenizer_path() -> None:
    assert policy_tokenizer_path("hf:/m/p") == "/m/p"
    assert policy_tokenizer_path("openai:http://h/v1#/m/served") == "/m/served"
    assert policy_tokenizer_path("openai:http://h/v1#served", "/tok") == "/tok"
    with pytest.raises(ValueError, match="names no tokenizer"):
        policy_tokenizer_path("oracle:arith")


def test_local_model_path(tmp_path: Path) -> None:
    assert local_model_path("org/name") == "org/name"  # a hub id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        local_model_path(str(tmp_path))


def test_load_tokenizer_is_cached_per_folder_content(tmp_path: Path) -> None:
    from pipelines.tiny.tokenizer import save_char_tokenizer

    save_char_tokenizer(tmp_path / "tok", model_max_length=128)
    first = load_tokenizer(str(tmp_path / "tok"))
    assert load_tokenizer(str(tmp_path / "tok")) is first
    assert first.model_max_length == 128
    save_char_tokenizer(tmp_path / "tok", model_max_length=64)  # saved again: loaded anew
    config = tmp_path / "tok" / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again is not first and again.model_max_length == 64
    with pytest.raises(FileNotFoundError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "nothing-here"))
