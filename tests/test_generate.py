"""`scope generate` end to end on a tiny random-init Qwen2: table contract, determinism, resume,
bad input."""

from __future__ import annotations

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipelines.engines.base import GenerationResult
from pipelines.stages.generate import GenerateConfig, run
from scope_data.grading import grade_response
from scope_data.hashing import derive_seed
from scope_data.schema import SCHEMAS
from scope_data.shards import ShardError, read_arrow, read_manifest
from tests.helpers_engines import build_random_tiny, write_problems

LONG = {"problem_id": "too-long", "source": "test", "source_index": 99, "task": "arith",
        "prompt": "Mod 10. Start with 1." + " Add 1." * 60, "answer": "1", "solution": None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = build_random_tiny(root / "model")
    write_problems(str(root / "problems"), n=4, extra=[LONG])
    return root, f"hf:{model}"


def cfg(root, policy, out, **kw) -> GenerateConfig:
    base = {"problems": str(root / "problems"), "policy": policy, "out": str(root / out),
            "n": 3, "max_new_tokens": 24, "seed": 7, "temperature": 1.0}
    return GenerateConfig(**{**base, **kw})


def test_table_shapes_dtypes_and_statuses(setup):
    root, policy = setup
    result = run(cfg(root, policy, "r1"), quiet=True)
    assert result.manifest is not None and result.manifest.rows == 5 * 3
    t = read_arrow(str(root / "r1"))
    assert t.schema.equals(SCHEMAS["rollouts"])
    rows = t.to_pylist()
    assert len({r["rollout_id"] for r in rows}) == 15
    for r in rows:
        assert r["seed"] == derive_seed(7, r["problem_id"], r["sample_idx"])
        assert r["policy"] == policy and r["round"] == 0
        assert len(r["response_token_ids"]) == len(r["behaviour_logprobs"])
        if r["problem_id"] == "too-long":
            assert r["status"] == "prompt_too_long" and r["finish_reason"] == "not_sent"
            assert r["response_token_ids"] == [] and r["reward"] == 0.0
        else:
            assert r["status"] in ("ok", "empty_response")
            assert 0 < len(r["response_token_ids"]) <= 24
            assert r["finish_reason"] in ("stop", "length")
            assert r["prompt_text"].startswith("<|user|>") and r["prompt_token_ids"]
            assert all(lp <= 0 for lp in r["behaviour_logprobs"])
    assert sorted({r["sample_idx"] for r in rows}) == [0, 1, 2]
    stats = result.manifest.stats
    assert stats["status"]["prompt_too_long"] == 3 and stats["responses"] == 12
    # the stage's timings: generation (with the prompts' rendering) and the verifier apart
    assert stats["generate_seconds"] > 0 and 0 < stats["grade_seconds"] < stats["generate_seconds"]
    assert t.schema.field("behaviour_logprobs").type == pa.list_(pa.float32())


def test_same_command_twice_gives_identical_rollouts_and_skips(setup):
    root, policy = setup
    run(cfg(root, policy, "a", limit=2), quiet=True)
    run(cfg(root, policy, "b", limit=2), quiet=True)
    a, b = read_arrow(str(root / "a")), read_arrow(str(root / "b"))
    assert a.num_rows == 6 and a.equals(b)
    # another batch size: the same tokens; log-probs equal up to matmul rounding
    run(cfg(root, policy, "c", limit=2, batch_size=2), quiet=True)
    c = read_arrow(str(root / "c"))
    assert c.column("response_token_ids").equals(a.column("response_token_ids"))
    for x, y in zip(a.column("behaviour_logprobs").to_pylist(),
                    c.column("behaviour_logprobs").to_pylist(), strict=True):
        assert max(abs(p - q) for p, q in zip(x, y, strict=True)) < 1e-5
    again = run(cfg(root, policy, "a", limit=2), quiet=True)
    assert again.parts_written == 0 and again.parts_skipped == 1
    assert read_arrow(str(root / "a")).equals(a)


def test_resume_after_crash_regenerates_only_missing_parts(setup, monkeypatch):
    root, policy = setup
    import pipelines.engines.hf as hf

    real = hf.HFGenerationEngine.generate
    calls = {"n": 0}

    def crash_on_second_part(self, requests):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, requests)

    monkeypatch.setattr(hf.HFGenerationEngine, "generate", crash_on_second_part)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg(root, policy, "crash", num_shards=3), quiet=True)
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(root / "crash"))
    done = {p.name: p.stat().st_mtime_ns for p in (root / "crash").glob("part-*.parquet")}
    assert 1 <= len(done) <= 2  # the part that crashed left no file
    monkeypatch.setattr(hf.HFGenerationEngine, "generate", real)
    resumed = run(cfg(root, policy, "crash", num_shards=3), quiet=True)
    assert resumed.parts_skipped == len(done) and resumed.parts_written == 3 - len(done)
    for name, mtime in done.items():  # finished parts were not regenerated
        assert (root / "crash" / name).stat().st_mtime_ns == mtime
    clean = run(cfg(root, policy, "clean", num_shards=3), quiet=True)
    key = ["rollout_id"]
    got = read_arrow(str(root / "crash")).sort_by([(k, "ascending") for k in key])
    want = read_arrow(str(root / "clean")).sort_by([(k, "ascending") for k in key])
    assert got.num_rows == 15 and got.equals(want)  # nothing lost, nothing duplicated
    assert clean.manifest.content_hash == resumed.manifest.content_hash


def test_empty_responses_are_kept_with_status(setup, monkeypatch):
    root, policy = setup
    import pipelines.engines.hf as hf

    real = hf.HFGenerationEngine.generate

    def blank_first(self, requests):
        out = real(self, requests)
        out[0] = [GenerationResult([self.tokenizer.eos_token_id], "", [-0.5], "stop")]
        return out

    monkeypatch.setattr(hf.HFGenerationEngine, "generate", blank_first)
    result = run(cfg(root, policy, "blank", limit=1), quiet=True)
    assert result.manifest.stats["status"]["empty_response"] >= 1
    rows = [r for r in read_arrow(str(root / "blank")).to_pylist()
            if r["status"] == "empty_response"]
    assert rows and all(r["reward"] == 0.0 and not r["correct"] for r in rows)


def test_grading_arith_and_math():
    prompt = "Mod 10. Start with 1. Subtract 7. Multiply by 7."
    assert grade_response("arith", prompt, "8", "1 - 7 = 4\n4 * 7 = 8\nAnswer: 8") == \
        ("8", True, "ok")
    assert grade_response("arith", prompt, "8", "1 - 7 = 4\nAnswer: 4")[1] is False
    pred, ok, status = grade_response("math", "What is 2+2?", "4", "So \\boxed{4}.")
    assert (pred, ok, status) == ("4", True, "ok")


def test_bad_input_errors(setup, tmp_path):
    root, policy = setup
    with pytest.raises(ShardError, match="nothing_here"):
        run(GenerateConfig(problems=str(tmp_path / "nothing_here"), policy=policy,
                           out=str(tmp_path / "o")), quiet=True)
    with pytest.raises(FileNotFoundError, match="no_model"):
        run(cfg(root, f"hf:{tmp_path / 'no_model'}", "x"), quiet=True)
    with pytest.raises(ValueError, match="valid forms"):
        run(cfg(root, "gpt:foo", "x"), quiet=True)
    assert not (tmp_path / "o").exists()


def test_cli_generate(setup):
    from cli.main import app

    root, policy = setup
    res = CliRunner().invoke(app, [
        "generate", "--problems", str(root / "problems"), "--policy", policy,
        "--out", str(root / "cli"), "--n", "2", "--limit", "2", "--max-new-tokens", "8",
    ])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "tokens/s" in res.output
    assert read_manifest(str(root / "cli")).rows == 4
    bad = CliRunner().invoke(app, ["generate", "--problems", str(root / "missing"), "--policy",
                                   policy, "--out", str(root / "cli2")])
    assert bad.exit_code == 1 and "missing" in bad.output


@pytest.mark.slow
def test_trained_tiny_policy_rollouts(tiny_policy, tmp_path):  # noqa: F811
    """With the warm-started tiny policy: graded mix, EOS stops, exact behaviour log-probs."""
    import torch
    from transformers import AutoModelForCausalLM

    from scope_data.tasks import arith

    write_problems(str(tmp_path / "problems"), n=8, seed=5)
    run(GenerateConfig(problems=str(tmp_path / "problems"), policy=f"hf:{tiny_policy}",
                       out=str(tmp_path / "r"), n=4, max_new_tokens=96, seed=3), quiet=True)
    rows = read_arrow(str(tmp_path / "r")).to_pylist()
    assert len(rows) == 32
    for r in rows:
        assert r["correct"] == arith.is_correct(arith.parse_prompt(r["prompt"]),
                                                r["response_text"])
        assert r["reward"] == float(r["correct"])
    assert sum(r["finish_reason"] == "stop" for r in rows) >= 24  # it learned to stop
    assert 0 < sum(r["correct"] for r in rows) < 32
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy), dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for r in rows[:8]:
            ctx, new = r["prompt_token_ids"], r["response_token_ids"]
            logits = model(torch.tensor([ctx + new])).logits[0, len(ctx) - 1 : -1]
            ref = torch.log_softmax(logits / r["temperature"], -1)
            ref = ref.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
            worst = max(worst, (ref - torch.tensor(r["behaviour_logprobs"])).abs().max().item())
    assert worst < 1e-4


def test_cli_tiny_policy_rejects_bad_options():
    from cli.main import app

    bad_steps = CliRunner().invoke(app, ["tiny-policy", "--steps", "6-3"])
    assert bad_steps.exit_code != 0 and "--steps" in bad_steps.output
    bad_rate = CliRunner().invoke(app, ["tiny-policy", "--error-rate", "1.5"])
    assert bad_rate.exit_code != 0 and "--error-rate" in bad_rate.output
