"""Splicing a teacher suffix onto the kept policy prefix (scope_data.correction)."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.engines.teachers import OracleTeacher, TeacherItem
from pipelines.tiny.tokenizer import build_char_tokenizer
from scope_data.correction import (
    CorrectionError,
    check_step_offsets,
    check_table_offsets,
    kept_prefix,
    splice,
)
from scope_data.steps import char_to_token_spans, split_steps
from scope_data.tasks import arith

TOK = build_char_tokenizer()


def encode(text: str) -> list[int]:
    return list(TOK(text, add_special_tokens=False)["input_ids"])


def decode(ids: list[int]) -> str:
    return TOK.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def corrupt(problem: arith.ArithProblem, j: int, wrong_offset: int) -> str:
    """A solution whose step j states a wrong result (later steps follow it consistently)."""
    vals = list(problem.values)
    wrong = (vals[j + 1] + wrong_offset) % problem.modulus
    lines, value = [], vals[0]
    for i, (op, b) in enumerate(problem.ops):
        result = wrong if i == j else arith.apply_op(value, op, b, problem.modulus)
        lines.append(arith.step_line(value, op, b, result))
        value = result
    return "\n".join([*lines, f"Answer: {value}"])


def scored_steps(text: str) -> tuple[list[int], list[dict]]:
    """Response ids (+EOS) and step dicts with token offsets, as the score stage makes them."""
    enc = TOK(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [*enc["input_ids"], TOK.eos_token_id]
    offsets = [*enc["offset_mapping"], (0, 0)]
    steps = split_steps(text, "newline")
    spans = char_to_token_spans(steps, offsets)
    return ids, [
        {"text": s.text, "char_start": s.char_start, "char_end": s.char_end,
         "token_start": a, "token_end": b, "score": 1.0}
        for s, (a, b) in zip(steps, spans, strict=True)
    ]


@st.composite
def failed_rollouts(draw: st.DrawFn) -> tuple[arith.ArithProblem, str, int]:
    modulus = draw(st.integers(3, 20))
    ops = draw(st.lists(st.tuples(st.sampled_from("+-*"), st.integers(0, 30)),
                        min_size=2, max_size=7))
    problem = arith.ArithProblem(draw(st.integers(0, modulus - 1)), tuple(ops), modulus)
    j = draw(st.integers(1, len(ops) - 1))
    text = corrupt(problem, j, draw(st.integers(1, modulus - 1)))
    return problem, text, j


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(failed_rollouts())
def test_oracle_splice_property(case: tuple[arith.ArithProblem, str, int]) -> None:
    problem, text, j = case
    ids, steps = scored_steps(text)
    k = arith.first_error(problem, text)
    assert k == j >= 1
    check_step_offsets("r", steps, len(ids), len(ids))
    prefix_ids, prefix_text = kept_prefix("r", steps, k, ids, text, decode)
    end = len(prefix_ids)
    assert end == steps[k]["token_start"]
    (out,) = OracleTeacher().continue_batch(
        [TeacherItem({"prompt": problem.prompt}, prefix_text, prefix_ids, k)]
    )
    assert out.status == "ok"
    suffix = out.text
    logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
    sp = splice(prefix_ids, logprobs[:end], suffix, encode, decode,
                eos_token_id=TOK.eos_token_id)
    # exactly the original prefix ids, then the policy encoding of the suffix, then EOS
    assert sp.response_token_ids[: sp.off_policy_start] == ids[:end]
    assert sp.off_policy_start == end
    assert sp.response_token_ids[end:] == [*encode(suffix), TOK.eos_token_id]
    assert sp.status == "ok"
    # decode(prefix + suffix) == prefix text + suffix text, judged fully correct
    assert decode(sp.response_token_ids) == prefix_text + suffix == sp.response_text
    assert all(arith.check_steps(problem, sp.response_text))
    assert arith.first_error(problem, sp.response_text) == -1
    assert arith.is_correct(problem, sp.response_text)
    # on-policy log-probs kept, off-policy ones NaN
    assert sp.behaviour_logprobs[:end] == pytest.approx(logprobs[:end])
    assert all(math.isnan(x) for x in sp.behaviour_logprobs[end:])
    assert len(sp.behaviour_logprobs) == len(sp.response_token_ids)


def test_truncated_suffix() -> None:
    sp = splice([5, 6, 7], [-1.0, -2.0, -3.0], "abcdef", encode, decode, max_response_tokens=6,
                eos_token_id=TOK.eos_token_id)
    assert sp.status == "truncated"
    assert sp.response_token_ids == [5, 6, 7, *encode("abc")]
    assert sp.response_text == decode([5, 6, 7]) + "abc"
    assert len(sp.behaviour_logprobs) == 6
    # fits exactly with EOS: not truncated
    sp = splice([5], [-1.0], "ab", encode, decode, max_response_tokens=4,
                eos_token_id=TOK.eos_token_id)
    assert sp.status == "ok" and sp.response_token_ids[-1] == TOK.eos_token_id


def test_empty_prefix_is_luffy() -> None:
    sp = splice([], [], "1 + 2 = 3", encode, decode)
    assert sp.off_policy_start == 0
    assert sp.response_token_ids == encode("1 + 2 = 3")
    assert sp.response_text == "1 + 2 = 3"


def test_offsets_that_do_not_fit_name_the_rollout() -> None:
    problem = arith.generate_problems(1, seed=3)[0]
    text, _ = arith.inject_error(problem, random.Random(0))
    ids, steps = scored_steps(text)
    with pytest.raises(CorrectionError, match="rollout abc123: step .* does not fit"):
        check_step_offsets("abc123", steps, len(ids) - 10, None)
    with pytest.raises(CorrectionError, match="rollout abc123: 3 behaviour_logprobs"):
        check_step_offsets("abc123", steps, len(ids), 3)
    bad = [dict(s) for s in steps]
    bad[1]["token_start"] = 0
    with pytest.raises(CorrectionError, match="must be ordered"):
        check_step_offsets("abc123", bad, len(ids), len(ids))
    # offsets in range but shifted: the decoded prefix does not end where step k starts
    shifted = [dict(s) for s in steps]
    shifted[1]["token_start"] += 2
    with pytest.raises(CorrectionError, match="rollout abc123: the tokens before step 1"):
        kept_prefix("abc123", shifted, 1, ids, text, decode)


def test_table_offsets_raise_the_first_bad_rows_error() -> None:
    """check_table_offsets flags rows with polars and raises check_step_offsets' message for
    the first bad row; rows without steps are not checked (as in the correct stage)."""
    problem = arith.generate_problems(1, seed=3)[0]
    text, _ = arith.inject_error(problem, random.Random(0))
    ids, steps = scored_steps(text)
    good = {"rollout_id": "ok", "steps": steps, "response_token_ids": ids,
            "behaviour_logprobs": [0.0] * len(ids)}
    unordered = [dict(s) for s in steps]
    unordered[1]["token_start"] = 0
    rows = [good, {**good, "rollout_id": "no-steps", "steps": [], "behaviour_logprobs": []},
            {**good, "rollout_id": "r2", "steps": unordered},
            {**good, "rollout_id": "r3", "response_token_ids": ids[:-10]}]
    check_table_offsets(pl.DataFrame(rows[:2]))
    with pytest.raises(CorrectionError, match="rollout r2: step 1 starts at token 0"):
        check_table_offsets(pl.DataFrame(rows))
    with pytest.raises(CorrectionError, match="rollout r3: .* behaviour_logprobs"):
        check_table_offsets(pl.DataFrame([rows[0], rows[3]]))


def test_prefix_logprob_count_must_match() -> None:
    with pytest.raises(ValueError, match="log-probs"):
        splice([1, 2], [-1.0], "x", encode, decode)
