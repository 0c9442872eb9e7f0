"""Step segmentation with character offsets, and the map from steps to response tokens.

Two modes:

- ``blank_line`` (default, real math solutions): steps are separated by one or more blank lines;
  a blank line inside display math (``$$...$$`` or ``\\[...\\]``) never splits. Each step's text
  is stripped of surrounding whitespace and its offsets point at the stripped text.
  Fragments are merged: a piece shorter than ``min_chars`` that does not end a sentence (a
  heading such as ``Step 2:``, a rule ``---``, a lone ``$$``) joins the following step, or the
  previous one when it is last. Short pieces that end with ``.``/``!``/``?`` (``n = 13.``) are
  statements and stay steps, so ``split_steps(join_steps(steps)) == steps`` for every ProcessBench
  row with the default ``min_chars`` (the merged step's text then spans the blank line between).
- ``newline`` (the arith and countdown tasks): each non-empty line is one step (stripped), no
  merging.

Every step satisfies ``response[step.char_start:step.char_end] == step.text``; steps are ordered
and non-overlapping.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

STEP_SEPARATOR = "\n\n"
SPLIT_MODES = ("blank_line", "newline")

# One or more blank lines: a newline, then lines holding only spaces/tabs/CR, then a newline.
_BLANK_LINES_RE = re.compile(r"\n(?:[^\S\n]*\n)+")
# Escaped backslash/dollar first so "\\[2pt]" (a LaTeX line break) is not read as "\[".
_MATH_DELIMITER_RE = re.compile(r"\\\\|\\\$|\$\$|\\\[|\\\]")
_SENTENCE_END_RE = re.compile(r"[.!?]['\")\]*_]*$")


@dataclass(frozen=True)
class Step:
    """One reasoning step: ``response[char_start:char_end] == text``."""

    text: str
    char_start: int
    char_end: int


def _display_math_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each closed ``$$...$$`` / ``\\[...\\]`` block.

    A ``\\[`` opened while another ``\\[`` is still open restarts the block, so an unclosed
    ``\\[`` (seen in real model output) cannot swallow the rest of the response; an unclosed
    block protects nothing.
    """
    spans: list[tuple[int, int]] = []
    open_kind: str | None = None
    open_at = 0
    for match in _MATH_DELIMITER_RE.finditer(text):
        token = match.group(0)
        if token == "$$":
            if open_kind is None:
                open_kind, open_at = "$$", match.start()
            elif open_kind == "$$":
                spans.append((open_at, match.end()))
                open_kind = None
        elif token == "\\[":
            if open_kind in (None, "\\["):
                open_kind, open_at = "\\[", match.start()
        elif token == "\\]" and open_kind == "\\[":
            spans.append((open_at, match.end()))
            open_kind = None
    return spans


def _stripped_piece(response: str, start: int, end: int) -> tuple[int, int] | None:
    """Offsets of ``response[start:end]`` without surrounding whitespace; None if blank."""
    piece = response[start:end]
    stripped = piece.strip()
    if not stripped:
        return None
    lead = len(piece) - len(piece.lstrip())
    return start + lead, start + lead + len(stripped)


def _blank_line_pieces(response: str) -> list[tuple[int, int]]:
    spans = _display_math_spans(response)
    pieces: list[tuple[int, int]] = []
    cursor = 0
    for separator in _BLANK_LINES_RE.finditer(response):
        position = separator.start()
        if any(start < position < end for start, end in spans):
            continue
        piece = _stripped_piece(response, cursor, position)
        if piece is not None:
            pieces.append(piece)
        cursor = separator.end()
    piece = _stripped_piece(response, cursor, len(response))
    if piece is not None:
        pieces.append(piece)
    return pieces


def _is_fragment(text: str, min_chars: int) -> bool:
    """A short piece that does not end a sentence (heading, rule, stray delimiter)."""
    return len(text) < min_chars and not _SENTENCE_END_RE.search(text)


def _merge_fragments(
    response: str, pieces: list[tuple[int, int]], min_chars: int
) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    pending_start: int | None = None
    for start, end in pieces:
        if pending_start is not None:
            start = pending_start
        if _is_fragment(response[start:end], min_chars):
            pending_start = start
            continue
        pending_start = None
        merged.append((start, end))
    if pending_start is not None:  # trailing fragment(s): join the previous step
        last_end = pieces[-1][1]
        if merged:
            merged[-1] = (merged[-1][0], last_end)
        else:
            merged.append((pending_start, last_end))
    return merged


def _newline_pieces(response: str) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    cursor = 0
    for line in response.split("\n"):
        piece = _stripped_piece(response, cursor, cursor + len(line))
        if piece is not None:
            pieces.append(piece)
        cursor += len(line) + 1
    return pieces


def split_mode_for(task: str | None, override: str | None = None) -> str:
    """The step-split mode of a response: ``override`` if given, else one step per line for
    the line-structured synthetic tasks (``arith``, ``countdown``), blank-line separated
    otherwise."""
    from scope_data.tasks import EXACT_TASKS

    if override is not None:
        return override
    return "newline" if task in EXACT_TASKS else "blank_line"


def split_steps(response: str, mode: str = "blank_line", min_chars: int = 8) -> list[Step]:
    """Split a response into steps with character offsets (see the module docstring).

    ``min_chars`` applies to ``blank_line`` mode only; ``min_chars=0`` disables merging.
    An empty or whitespace-only response gives ``[]``.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}")
    if not response or not response.strip():
        return []
    if mode == "newline":
        spans = _newline_pieces(response)
    else:
        spans = _merge_fragments(response, _blank_line_pieces(response), min_chars)
    return [Step(response[start:end], start, end) for start, end in spans]


def join_steps(steps_text: Sequence[str]) -> str:
    """Join step texts with a blank line (the inverse of ``blank_line`` splitting)."""
    return STEP_SEPARATOR.join(steps_text)


def _monotone_offsets(offset_mapping: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Non-decreasing token starts; zero-width tokens (special tokens report ``(0, 0)``) are
    placed at the end of the text seen so far."""
    fixed: list[tuple[int, int]] = []
    previous_start = previous_end = 0
    for raw_start, raw_end in offset_mapping:
        start, end = int(raw_start), int(raw_end)
        if end <= start:
            start = end = previous_end
        else:
            start = max(start, previous_start)
            end = max(end, start)
        fixed.append((start, end))
        previous_start, previous_end = start, max(previous_end, end)
    return fixed


def _token_owner(start: int, end: int, steps: Sequence[Step],
                 starts: Sequence[int] | None = None) -> int:
    """Index of the step that owns a token; -1 before the first step, len(steps) after.

    `starts` (the steps' char_start, ascending) may be passed to avoid rebuilding it; the
    lookups are binary searches, so a response of S steps and T tokens costs O(T log S).
    """
    if start >= steps[-1].char_end:
        return len(steps)
    if starts is None:
        starts = [step.char_start for step in steps]
    # the last step the token reaches (overlaps, or lies at/after its start)
    reached = (bisect_right(starts, end) if end == start else bisect_left(starts, end)) - 1
    # a token starting inside an earlier step's text belongs to that step
    inside = bisect_right(starts, start) - 1
    if 0 <= inside < reached and start < steps[inside].char_end:
        return inside
    return reached


def char_to_token_spans(
    steps: Sequence[Step], offset_mapping: Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """Per step, the response-token range ``(token_start, token_end)``, end exclusive.

    ``offset_mapping`` is the (char_start, char_end) of each RESPONSE token, as a Hugging Face
    fast tokenizer returns with ``return_offsets_mapping=True`` (special tokens' ``(0, 0)`` are
    read as zero-width at the current position). Rule:

    - a token belongs to the step where it starts; a token starting in the whitespace between
      two steps belongs to the next step if it reaches into that step's text, else to the
      previous step (so separator tokens such as "\\n\\n" close the step before them);
    - tokens wholly before the first step or starting at/after the last step's end belong to
      no step.

    Hence spans are ordered, non-overlapping and contiguous (``token_end`` of step k is
    ``token_start`` of step k+1), and ``tokens[:spans[k][0]]`` is exactly the prefix before
    step k. A step that lies wholly inside a token that started in an earlier step gets an
    empty span ``(t, t)``.
    """
    if not steps:
        return []
    starts = [step.char_start for step in steps]
    owners = [_token_owner(start, end, steps, starts)
              for start, end in _monotone_offsets(offset_mapping)]
    reach, high = [], -1  # reach[t] = max(owners[:t + 1]): "first t with owner >= k" by bisect
    for owner in owners:
        high = max(high, owner)
        reach.append(high)
    spans: list[tuple[int, int]] = []
    for index in range(len(steps)):
        token_start = bisect_left(reach, index)
        token_end = bisect_left(reach, index + 1)
        spans.append((token_start, max(token_start, token_end)))
    return spans
