"""PRM engines: hf-cls / hf-tag against hand-written reference computations, packing,
truncation, NaN handling, rule:arith, and spec errors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from pipelines.engines.base import load_prm, score_with_status
from pipelines.engines.spec import SpecError, parse_spec
from scope_data.tasks import arith

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

PROBLEM = "Mod 10. Start with 1. Subtract 7. Multiply by 7."
ITEMS = [
    (PROBLEM, ["1 - 7 = 4", "4 * 7 = 8", "Answer: 8"]),
    ("Mod 10. Start with 3. Add 4.", ["3 + 4 = 7", "Answer: 7"]),
    ("What is 2+2? Explain.", ["We add.", "2 + 2 = 4, so the total is four.", "So 4.", "Done"]),
    ("A single step problem", ["x" * 30]),
]


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tiny.prm import init_tiny_prm

    return init_tiny_prm(tmp_path_factory.mktemp("cls"), "cls", seed=1)


@pytest.fixture(scope="module")
def tag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tiny.prm import init_tiny_prm

    return init_tiny_prm(tmp_path_factory.mktemp("tag"), "tag", seed=2)


def reference_cls(model_dir: Path, problem: str, steps: list[str]) -> list[float]:
    """The Qwen2.5-Math-PRM model card computation, written out by hand."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer "
         "within \\boxed{}."},
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    sep = tok.encode("<extra_0>", add_special_tokens=False)[0]
    at_sep = logits[ids[0] == sep]
    return torch.softmax(at_sep, dim=-1)[:, 1].tolist()


def reference_tag(model_dir: Path, problem: str, steps: list[str]) -> list[float]:
    """The Math-Shepherd model card computation: logits at the tag, softmax over (+, -)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = problem + " " + "\n".join(s + " ки" for s in steps)
    ids = torch.tensor([tok.encode(text)])
    candidates = tok.encode("+-", add_special_tokens=False)
    tag = tok.encode("ки", add_special_tokens=False)[-1]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0][:, candidates]
    return logits.softmax(dim=-1)[:, 0][ids[0] == tag].tolist()


@pytest.mark.parametrize("family", ["cls", "tag"])
def test_hf_prm_matches_reference_computation(family: str, cls_dir: Path, tag_dir: Path) -> None:
    model_dir = cls_dir if family == "cls" else tag_dir
    reference = reference_cls if family == "cls" else reference_tag
    prm = load_prm(f"hf-{family}:{model_dir}", device="cpu", dtype="float32", batch_tokens=600)
    got = prm.score_batch(ITEMS)
    for (problem, steps), scores in zip(ITEMS, got, strict=True):
        want = reference(model_dir, problem, steps)
        assert len(scores) == len(steps) == len(want)
        assert scores == pytest.approx(want, abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in scores)
    # one at a time (no padding) gives the same numbers as the packed batch
    single = [prm.score(p, s) for p, s in ITEMS]
    for a, b in zip(single, got, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # qwen2 is causal: right padding runs without a mask; with the mask (any other family) the
    # numbers are the same
    assert prm.causal
    prm.causal = False
    for a, b in zip(prm.score_batch(ITEMS), got, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_step_tag_inside_step_text_is_removed(tag_dir: Path) -> None:
    prm = load_prm(f"hf-tag:{tag_dir}", device="cpu")
    with_tag = prm.score(PROBLEM, ["1 - 7 = 4 ки", "4 * 7 = 8"])
    clean = prm.score(PROBLEM, ["1 - 7 = 4 ", "4 * 7 = 8"])
    assert len(with_tag) == 2 and with_tag == pytest.approx(clean, abs=1e-6)


def test_pack_by_length_respects_budget() -> None:
    from pipelines.engines.prm_hf import pack_by_length

    lengths = [5, 100, 7, 50, 51, 300, 3]
    batches = pack_by_length(lengths, 120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 120 or len(b) == 1
    assert [5] in batches  # the 300-token row rides alone


def test_long_input_is_truncated_keeping_the_head(tag_dir: Path) -> None:
    prm = load_prm(f"hf-tag:{tag_dir}", device="cpu", max_length=80)
    steps = ["1 - 7 = 4", "4 * 7 = 8", "y" * 10_000, "Answer: 8"]
    (res,) = score_with_status(prm, [(PROBLEM, steps)])
    assert res.status == "truncated"
    full = load_prm(f"hf-tag:{tag_dir}", device="cpu").score(PROBLEM, steps[:2])
    # kept steps score exactly as without the tail (causal model), the rest are NaN
    assert res.scores[:2] == pytest.approx(full, abs=1e-5)
    assert all(math.isnan(x) for x in res.scores[2:])


def test_nan_logits_give_nan_status(cls_dir: Path) -> None:
    prm = load_prm(f"hf-cls:{cls_dir}", device="cpu")
    with torch.no_grad():
        prm.model.score.weight.fill_(float("nan"))
    (res,) = score_with_status(prm, [(PROBLEM, ["1 - 7 = 4", "4 * 7 = 8"])])
    assert res.status == "nan" and all(math.isnan(x) for x in res.scores)


def test_bad_tokens_and_remote_code_errors(tag_dir: Path, cls_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a single token"):
        load_prm(f"hf-tag:{tag_dir}", good_token="good", device="cpu")
    import json

    cfg = json.loads((cls_dir / "config.json").read_text())
    remote = cls_dir.parent / "remote"
    remote.mkdir(exist_ok=True)
    for f in cls_dir.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    cfg["architectures"] = ["Qwen2ForProcessRewardModel"]
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_prm(f"hf-cls:{remote}", device="cpu")


def test_rule_prm_matches_arith_checker() -> None:
    prm = load_prm("rule:arith")
    rng = random.Random(0)
    for p in arith.generate_problems(200, seed=3):
        text = arith.inject_error(p, rng)[0] if rng.random() < 0.5 else p.solution
        scores = prm.score(p.prompt, arith.response_lines(text))
        assert scores == [1.0 if ok else 0.0 for ok in arith.check_steps(p, text)]
    # a multi-line step is right iff all its lines are; an empty step is NaN
    p = arith.generate_problems(1, seed=4)[0]
    lines = p.solution_lines
    got = prm.score(p.prompt, ["\n".join(lines[:2]), " ", *lines[2:]])
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2:] == [1.0] * (len(lines) - 2)
    with pytest.raises(ValueError, match="not an arith prompt"):
        prm.score("What is 2+2?", ["4"])


def test_unknown_prm_spec_lists_valid_forms() -> None:
    with pytest.raises(SpecError, match="valid forms: rule:arith, hf-cls:<model>"):
        parse_spec("foo:bar", "prm")
    with pytest.raises(SpecError):
        load_prm("rule:gsm8k")


@pytest.mark.slow
def test_tiny_prm_build_is_cached_and_loads_as_hf_tag(tmp_path: Path, monkeypatch) -> None:
    import json

    from pipelines.tiny.prm import TinyPRMConfig, build_tiny_prm, labelled_responses
    from scope_data.first_error import locate, subset_metrics

    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    small = {"max_steps": 15, "num_examples": 300, "eval_examples": 60, "hidden_size": 64,
             "num_heads": 2, "intermediate_size": 128}
    path = build_tiny_prm(num_threads=1, **small)
    meta = json.loads((path / "scope_tiny.json").read_text())
    assert meta["config_hash"] == TinyPRMConfig(**small).hash()
    assert path.parent.name == "tiny-prm" and path.name == meta["config_hash"]
    mtime = (path / "model.safetensors").stat().st_mtime
    assert build_tiny_prm(num_threads=1, **small) == path  # cached: not retrained
    assert (path / "model.safetensors").stat().st_mtime == mtime
    # the stored held-out metrics are what hf-tag scoring of that set gives
    prm = load_prm(f"hf-tag:{path}", device="cpu")
    cfg = TinyPRMConfig(**small)
    rows = labelled_responses(cfg.eval_examples, cfg.seed + 7_000_001, cfg.steps, cfg.modulus,
                              cfg.error_share)
    preds = [locate(s, 0.5) for s in prm.score_batch([(p, lines) for p, lines, _ in rows])]
    gold = [next((k for k, ok in enumerate(v) if not ok), -1) for _, _, v in rows]
    assert meta["eval"]["f1"] == pytest.approx(subset_metrics("x", preds, gold).f1)
    # copying a cached build to --out
    out = build_tiny_prm(tmp_path / "copy", num_threads=1, **small)
    assert (out / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
