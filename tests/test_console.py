"""Progress when stderr is not a terminal: plain lines, throttled, nothing for short work."""

from __future__ import annotations

import pytest

from pipelines.console import LineProgress, part_task


def test_line_progress_prints_throttled_lines(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("pipelines.console.time.monotonic", lambda: next(clock))
    with LineProgress(every=2) as bar:
        task = part_task(bar, "score part 0", 3)
        assert part_task(bar, "score part 0", 1) == task  # one task per part, total grows
        for _ in range(4):
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("score part 0: 1/4 (25%)")
    assert lines[-1].startswith("score part 0: 4/4 (100%)")  # the final state, once
    assert len(lines) == len(set(lines))


def test_short_work_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with LineProgress(every=60) as bar:
        bar.advance(bar.add_task("generate", total=2), 2)
    assert capsys.readouterr().err == ""
