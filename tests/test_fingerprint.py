"""Model fingerprints in stage configs: new weights at the same path rerun a stage."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.config import manifest_config
from pipelines.engines.fingerprint import SAMPLE_BYTES, folder_fingerprint, model_fingerprint
from pipelines.stages.generate import GenerateConfig


def _model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_fingerprint_follows_content_not_path_or_run_records(tmp_path: Path) -> None:
    big = bytes(range(256)) * (3 * SAMPLE_BYTES // 256)  # sampled: head and tail MiB
    a = _model(tmp_path / "a", big)
    base = folder_fingerprint(a)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, copy)
    assert folder_fingerprint(copy) == base  # same bytes elsewhere: same fingerprint
    (a / "train_manifest.json").write_text('{"created": "now"}')
    (a / ".lock").write_text("")
    (a / "checkpoint-5").mkdir()
    (a / "checkpoint-5" / "optimizer.pt").write_bytes(b"x" * 10)
    assert folder_fingerprint(a) == base  # run records and trainer checkpoints do not count
    (a / "model.safetensors").write_bytes(big[:-1] + b"\x00")  # retrained: the tail changed
    assert folder_fingerprint(a) != base
    (a / "model.safetensors").write_bytes(big)
    (a / "config.json").write_text('{"model_type": "llama"}')
    assert folder_fingerprint(a) != base


def test_specs_without_local_folder_have_none(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", b"weights")
    assert model_fingerprint(f"hf:{folder}") == model_fingerprint(f"vllm:{folder}") \
        == folder_fingerprint(folder)
    assert model_fingerprint(f"hf-cls:{folder}", "prm") == folder_fingerprint(folder)
    assert model_fingerprint("hf:Qwen/Qwen2.5-Math-7B") is None  # hub id: nothing local
    assert model_fingerprint(f"openai:http://127.0.0.1:1/v1#{folder}") is None
    assert model_fingerprint("rule:arith", "prm") is None
    assert model_fingerprint("oracle:arith", "teacher") is None


def test_generate_config_hash_changes_with_weights(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", b"old weights")
    cfg = GenerateConfig(problems="p", policy=f"hf:{folder}", out="o")
    before = manifest_config("generate", cfg)
    (folder / "model.safetensors").write_bytes(b"new weights")
    after = manifest_config("generate", cfg)
    assert before["policy"] == after["policy"]
    assert before["policy_fingerprint"] != after["policy_fingerprint"]
