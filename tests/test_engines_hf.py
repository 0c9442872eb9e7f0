"""The hf generation engine on a tiny random-init Qwen2: exact log-probs, seeds, stopping."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.engines.base import GenerationRequest, load_generation_engine
from pipelines.engines.prompts import render_and_encode
from tests.helpers_engines import build_random_tiny

PROMPTS = ["Mod 10. Start with 1. Add 3.", "Mod 10. Start with 5. Add 3. Multiply by 2.",
           "Mod 10. Start with 9. Subtract 4. Add 8. Multiply by 3. Add 1."]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = build_random_tiny(tmp_path_factory.mktemp("tiny_random"))
    eng = load_generation_engine(f"hf:{model_dir}", batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return render_and_encode(engine.tokenizer, PROMPTS)[1]


def recomputed(engine, context: list[int], new: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of `new` after `context`, from one unpadded forward pass."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([context + new])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(context) - 1 : -1]
    return logp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)


def test_logprobs_equal_recomputed_at_temperature(engine, prompt_ids):
    reqs = [GenerationRequest(ids, n=3, temperature=0.7, max_new_tokens=40, seed=11 + k)
            for k, ids in enumerate(prompt_ids)]
    results = engine.generate(reqs)
    assert [len(r) for r in results] == [3, 3, 3]
    worst = 0.0
    for req, samples in zip(reqs, results, strict=True):
        for res in samples:
            assert len(res.token_ids) == len(res.logprobs) > 0
            assert res.finish_reason in ("stop", "length")
            ref = recomputed(engine, req.prompt_token_ids, res.token_ids, 0.7)
            worst = max(worst, (ref - torch.tensor(res.logprobs)).abs().max().item())
    assert worst < 1e-4


def test_prefix_is_continued_and_only_new_tokens_returned(engine, prompt_ids):
    prefix = engine.tokenizer("1 + 3 = 4\n", add_special_tokens=False)["input_ids"]
    req = GenerationRequest(prompt_ids[0], temperature=1.0, max_new_tokens=20, seed=3,
                            prefix_token_ids=prefix)
    res = engine.generate([req])[0][0]
    ref = recomputed(engine, prompt_ids[0] + prefix, res.token_ids, 1.0)
    assert (ref - torch.tensor(res.logprobs)).abs().max().item() < 1e-4
    # the same context given as a plain prompt samples the same tokens
    plain = engine.generate([GenerationRequest(prompt_ids[0] + prefix, temperature=1.0,
                                               max_new_tokens=20, seed=3)])[0][0]
    assert plain.token_ids == res.token_ids


def test_seeded_samples_do_not_depend_on_batch(engine, prompt_ids):
    alone = engine.generate([GenerationRequest(prompt_ids[1], n=2, max_new_tokens=30, seed=5)])
    mixed = engine.generate([
        GenerationRequest(prompt_ids[2], n=3, max_new_tokens=30, seed=9),
        GenerationRequest(prompt_ids[1], n=2, max_new_tokens=30, seed=5),
        GenerationRequest(prompt_ids[0], n=1, max_new_tokens=30, seed=1),
    ])
    assert [r.token_ids for r in alone[0]] == [r.token_ids for r in mixed[1]]
    # sample i uses seed + i: sample 1 of seed 5 is sample 0 of seed 6
    shifted = engine.generate([GenerationRequest(prompt_ids[1], max_new_tokens=30, seed=6)])
    assert shifted[0][0].token_ids == alone[0][1].token_ids
    assert alone[0][0].token_ids != alone[0][1].token_ids


def test_greedy_matches_model_generate(engine, prompt_ids):
    res = engine.generate([GenerationRequest(ids, temperature=0.0, max_new_tokens=25)
                           for ids in prompt_ids])
    for ids, (r,) in zip(prompt_ids, res, strict=True):
        out = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=25,
                                    pad_token_id=engine.pad_id)
        ref = out[0, len(ids):].tolist()
        assert r.token_ids == ref[: len(r.token_ids)]
        # greedy reports log-probs at T = 1, like vLLM
        assert (recomputed(engine, ids, r.token_ids, 1.0)
                - torch.tensor(r.logprobs)).abs().max().item() < 1e-4


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, prompt_ids):
    t, p = 0.8, 0.5
    r = engine.generate([GenerationRequest(prompt_ids[0], temperature=t, top_p=p,
                                           max_new_tokens=15, seed=2)])[0][0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt_ids[0] + r.token_ids])).logits[0].float()
    probs = torch.softmax(logits / t, -1)[len(prompt_ids[0]) - 1 : -1]
    for j, tok in enumerate(r.token_ids):
        sorted_p, order = probs[j].sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < p
        nucleus = set(order[keep].tolist())
        assert tok in nucleus
        expected = math.log(probs[j, tok].item() / sorted_p[keep].sum().item())
        assert abs(r.logprobs[j] - expected) < 1e-4


def test_stop_at_eos_and_length(engine, prompt_ids):
    res = engine.generate([GenerationRequest(prompt_ids[0], n=12, max_new_tokens=40, seed=0)])[0]
    eos = engine.tokenizer.eos_token_id
    reasons = {r.finish_reason for r in res}
    assert reasons == {"stop", "length"}  # random weights: EOS ~1% per token
    for r in res:
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == eos and eos not in r.token_ids[:-1]
        else:
            assert len(r.token_ids) == 40 and eos not in r.token_ids
        assert "<|eos|>" not in r.text


def test_budget_capped_by_context_and_too_long_prompt(engine, prompt_ids):
    long_prompt = (prompt_ids[0] * 20)[: engine.max_model_len - 5]
    r = engine.generate([GenerationRequest(long_prompt, max_new_tokens=10_000, seed=0,
                                           temperature=0.01)])[0][0]
    assert len(r.token_ids) <= 5 and (len(r.token_ids) == 5 or r.finish_reason == "stop")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([GenerationRequest([5] * engine.max_model_len)])


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_generation_engine(f"hf:{missing}")
