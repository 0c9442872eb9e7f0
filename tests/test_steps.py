"""Step splitting, offsets, ProcessBench round trip, and steps -> token spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_data.steps import Step, char_to_token_spans, join_steps, split_steps


def texts(steps: list[Step]) -> list[str]:
    return [step.text for step in steps]


def assert_offsets_valid(response: str, steps: list[Step]) -> None:
    previous_end = 0
    for step in steps:
        assert response[step.char_start : step.char_end] == step.text
        assert step.text and step.text == step.text.strip()
        assert previous_end <= step.char_start < step.char_end
        previous_end = step.char_end


# ------------------------------------------------------------------------- blank_line


def test_blank_line_split_offsets_point_at_stripped_text() -> None:
    response = "  First we add 2 and 3.\n\n\n \t\nThen multiply by 4.  \n\nAnswer: 20\n"
    steps = split_steps(response)
    assert texts(steps) == ["First we add 2 and 3.", "Then multiply by 4.", "Answer: 20"]
    assert (steps[0].char_start, steps[0].char_end) == (2, 23)
    assert_offsets_valid(response, steps)


def test_blank_line_with_crlf_and_single_newlines() -> None:
    response = "Line one of step one.\nLine two of step one.\r\n\r\nStep two here."
    assert texts(split_steps(response)) == [
        "Line one of step one.\nLine two of step one.",
        "Step two here.",
    ]


def test_no_split_inside_display_math() -> None:
    response = (
        "We compute the sum:\n$$\na + b\n\n= c\n$$\nwhich is easy.\n\n"
        "Next the integral:\n\\[\n\\int_0^1 x\\,dx\n\n= \\tfrac12\n\\]\n\nDone, so 1/2."
    )
    assert texts(split_steps(response)) == [
        "We compute the sum:\n$$\na + b\n\n= c\n$$\nwhich is easy.",
        "Next the integral:\n\\[\n\\int_0^1 x\\,dx\n\n= \\tfrac12\n\\]",
        "Done, so 1/2.",
    ]


def test_unclosed_display_math_does_not_swallow_the_rest() -> None:
    # ProcessBench math-85: step 1 opens \[ and never closes it.
    response = "So:\n\\[\nx = 1.\n\nNext we get:\n\\[\ny = 2\n\n\\]\n\nTherefore y = 2."
    assert texts(split_steps(response, min_chars=0)) == [
        "So:\n\\[\nx = 1.",
        "Next we get:\n\\[\ny = 2\n\n\\]",
        "Therefore y = 2.",
    ]


def test_latex_line_break_is_not_a_display_math_opener() -> None:
    response = "Rows: a \\\\[2pt] b.\n\nSecond step here."
    assert texts(split_steps(response)) == ["Rows: a \\\\[2pt] b.", "Second step here."]


def test_short_fragments_merge_forward_or_back() -> None:
    response = "Step 1:\n\nAdd the two numbers.\n\n---\n\nNow subtract five.\n\n$x$"
    steps = split_steps(response)
    assert texts(steps) == [
        "Step 1:\n\nAdd the two numbers.",
        "---\n\nNow subtract five.\n\n$x$",
    ]
    assert_offsets_valid(response, steps)
    assert texts(split_steps("Hi:\n\nok")) == ["Hi:\n\nok"]


def test_short_sentences_stay_steps_and_min_chars_zero_disables_merging() -> None:
    response = "n = 12 + 1.\n\nn = 13.\n\n...\n\nSo 13."
    assert texts(split_steps(response)) == ["n = 12 + 1.", "n = 13.", "...", "So 13."]
    assert texts(split_steps("Step 1:\n\nAdd them.", min_chars=0)) == ["Step 1:", "Add them."]


@pytest.mark.parametrize("response", ["", "   ", "\n\n\n", " \t\r\n "])
def test_empty_response_has_no_steps(response: str) -> None:
    assert split_steps(response) == []
    assert split_steps(response, mode="newline") == []


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split mode"):
        split_steps("a", mode="sentences")


@pytest.mark.parametrize("name", ["processbench.gsm8k.json", "processbench.math.json"])
def test_processbench_round_trip_with_default_settings(shared_data: Path, name: str) -> None:
    rows = json.loads((shared_data / name).read_text(encoding="utf-8"))
    assert len(rows) == {"processbench.gsm8k.json": 400, "processbench.math.json": 1000}[name]
    mismatched = [
        row["id"]
        for row in rows
        if texts(split_steps(join_steps(row["steps"]))) != [s.strip() for s in row["steps"]]
    ]
    assert mismatched == []


def test_join_steps() -> None:
    assert join_steps(["a", "b", "c"]) == "a\n\nb\n\nc"
    assert join_steps([]) == ""


# ------------------------------------------------------------------------- newline


def test_newline_mode_arith() -> None:
    response = "23 + 18 = 41\n41 - 7 = 34\n\n  34 * 2 = 68 \nAnswer: 68\n"
    steps = split_steps(response, mode="newline")
    assert texts(steps) == ["23 + 18 = 41", "41 - 7 = 34", "34 * 2 = 68", "Answer: 68"]
    assert [(s.char_start, s.char_end) for s in steps] == [(0, 12), (13, 24), (28, 39), (41, 51)]
    # no merging in newline mode, whatever min_chars says
    assert texts(split_steps("1\n2\n3", mode="newline", min_chars=8)) == ["1", "2", "3"]


_TEXT = st.text(alphabet=st.sampled_from(list("ab .:$\\[]\n\n \t\r")), max_size=200)


@settings(max_examples=300, deadline=None)
@given(response=_TEXT, mode=st.sampled_from(["blank_line", "newline"]),
       min_chars=st.integers(0, 12))
def test_offsets_invariants_property(response: str, mode: str, min_chars: int) -> None:
    steps = split_steps(response, mode=mode, min_chars=min_chars)
    assert_offsets_valid(response, steps)
    # nothing but whitespace is lost
    covered = "".join(response[s.char_start : s.char_end] for s in steps)
    assert "".join(covered.split()) == "".join(response.split())
    if mode == "newline":
        assert all("\n" not in step.text for step in steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("abc 12.=")), min_size=1), max_size=8))
def test_blank_line_round_trip_property(steps_text: list[str]) -> None:
    steps_text = [s for s in (t.strip() for t in steps_text) if s]
    assert texts(split_steps(join_steps(steps_text), min_chars=0)) == steps_text


# ------------------------------------------------------------------------- token spans


def test_char_to_token_spans_with_straddling_and_separator_tokens() -> None:
    response = "Add 2.\n\nTimes 3.\n\nSo 6."
    steps = split_steps(response)
    assert [(s.char_start, s.char_end) for s in steps] == [(0, 6), (8, 16), (18, 23)]
    offsets = [
        (0, 3),  # "Add"            step 0
        (3, 5),  # " 2"             step 0
        (5, 8),  # ".\n\n"          starts in step 0
        (8, 13),  # "Times"         step 1
        (13, 17),  # " 3.\n"        step 1 (runs into the gap)
        (17, 18),  # "\n"           gap only: closes step 1
        (18, 21),  # "So "          step 2
        (21, 23),  # "6."           step 2
        (0, 0),  # <|endoftext|>    special token after the text: no step
    ]
    assert char_to_token_spans(steps, offsets) == [(0, 3), (3, 6), (6, 8)]


def test_token_starting_in_gap_and_reaching_next_step_belongs_to_next() -> None:
    response = "First.\n\nSecond."
    steps = split_steps(response, min_chars=0)
    offsets = [(0, 6), (6, 9), (9, 15)]  # "First." | "\n\nS" | "econd."
    assert char_to_token_spans(steps, offsets) == [(0, 1), (1, 3)]


def test_token_straddling_two_steps_belongs_to_where_it_starts() -> None:
    response = "12\n34\n56"
    steps = split_steps(response, mode="newline")
    offsets = [(0, 1), (1, 4), (4, 5), (5, 7), (7, 8)]  # "1" | "2\n3" | "4" | "\n5" | "6"
    # "2\n3" starts in step 0; "\n5" starts in the gap and reaches step 2
    assert char_to_token_spans(steps, offsets) == [(0, 2), (2, 3), (3, 5)]


def test_leading_tokens_and_empty_spans() -> None:
    response = "  ab\n\ncd"
    steps = split_steps(response, min_chars=0)
    offsets = [(0, 2), (2, 4), (4, 8)]  # "  " (before step 0) | "ab" | "\n\ncd" spans into step 1
    assert char_to_token_spans(steps, offsets) == [(1, 2), (2, 3)]
    # one token covering a step after starting in the previous one: empty span for that step
    assert char_to_token_spans(steps, [(2, 8)]) == [(0, 1), (1, 1)]
    assert char_to_token_spans([], [(0, 1)]) == []


@settings(max_examples=200, deadline=None)
@given(response=_TEXT, cuts=st.lists(st.integers(0, 200), max_size=40))
def test_token_spans_partition_property(response: str, cuts: list[int]) -> None:
    steps = split_steps(response, min_chars=0)
    bounds = sorted({0, len(response), *(c for c in cuts if c <= len(response))})
    offsets = list(zip(bounds[:-1], bounds[1:], strict=True))
    spans = char_to_token_spans(steps, offsets)
    assert len(spans) == len(steps)
    for (start, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert start <= end == next_start
    owner = {t: k for k, (start, end) in enumerate(spans) for t in range(start, end)}
    for t, (tok_start, tok_end) in enumerate(offsets):
        for k, step in enumerate(steps):
            if step.char_start <= tok_start < step.char_end:  # starts inside step k
                assert owner.get(t) == k
            next_start = steps[k + 1].char_start if k + 1 < len(steps) else None
            if next_start is not None and step.char_end <= tok_start and tok_end <= next_start:
                assert owner.get(t) == k  # wholly in the gap after step k


def test_token_spans_with_a_real_fast_tokenizer(shared_data: Path) -> None:
    """Byte-level BPE (trained here on ProcessBench text): the token prefix before step k
    decodes to the response up to step k, with steps 0..k-1 complete and nothing of step k."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = json.loads((shared_data / "processbench.math.json").read_text(encoding="utf-8"))[:60]
    responses = [join_steps(row["steps"]) for row in rows]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(responses, trainer)
    for response in responses:
        encoding = tokenizer.encode(response)
        steps = split_steps(response)
        spans = char_to_token_spans(steps, encoding.offsets)
        assert spans[0][0] == 0 and spans[-1][1] == len(encoding.ids)
        for k in range(1, len(steps)):
            prefix = tokenizer.decode(encoding.ids[: spans[k][0]])
            assert response.startswith(prefix)
            assert steps[k - 1].char_end <= len(prefix) <= steps[k].char_start
