"""The online launcher's progress view: each role's round, lags, trainer period, throughput."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.loop.online_progress import OnlineProgress, read_local

ROLES = ["generate", "score", "correct", "train", "eval"]


def _mark(run: Path, name: str, seconds: float) -> str:
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": seconds, "output": "$RUN_DIR/nowhere"}))
    return name


def test_status_lines_follow_the_markers(tmp_path) -> None:
    now = [0.0]
    progress = OnlineProgress(tmp_path, 1, ROLES, read_local(tmp_path), t0=0.0,
                              clock=lambda: now[0])
    lines: list[str] = []
    plan = [(1.0, "problems/_stages/train.json"), (2.0, "round-0000/_stages/eval-heldout.json"),
            (3.0, "round-0001/_stages/generate.json"), (3.5, "round-0001/_stages/score.json"),
            (4.0, "round-0002/_stages/generate.json"), (4.2, "round-0001/_stages/correct.json"),
            (6.0, "round-0001/_stages/train.json"), (9.0, "round-0002/_stages/score.json"),
            (9.5, "round-0002/_stages/correct.json"), (10.0, "round-0002/_stages/train.json")]
    for at, name in plan:
        now[0] = at
        progress.update([_mark(tmp_path, name, 0.5)], lines.append)
    progress.update([plan[-1][1]], lines.append)  # a marker seen before prints nothing
    assert len(lines) == len(plan)
    assert lines[0].startswith("[    1.0s] problems/train done | generate - ·")
    # K = 1: round 2 was sampled by v0 while the trainer had not finished round 1
    assert lines[4] == ("[    4.0s] round-0002/generate done | generate r2 (v0) · score r1 "
                        "(lag 1) · correct - · train - · eval r0")
    assert lines[6].endswith("train r1 (lag 1) · eval r0 (lag 1)")
    assert lines[-1].endswith("train r2 · eval r0 (lag 2) | 4.0 s/round")
    rows = dict(progress.summary_rows({"generate": {"restarts": 1}, "eval": {}}))
    assert rows["generate worker"] == "2 rounds, busy 10%, 1 restarts"  # 1 s of 10 s
    assert rows["eval worker"] == "1 rounds, busy 5%, 0 restarts"
    assert rows["seconds per round (trainer)"] == 4.0
    # a role split over workers: a marker holds one worker's time, so no busy share
    rows = dict(progress.summary_rows({"generate-0": {"restarts": 1},
                                       "generate-1": {"restarts": 2}}))
    assert rows["generate worker"] == "2 rounds, 2 workers, 3 restarts"


def test_throughput_from_generate_tables(tmp_path, monkeypatch) -> None:
    from pipelines.loop import online_progress

    monkeypatch.setattr(online_progress, "_rows", lambda run_dir, body: 120)
    now = [5.0]
    progress = OnlineProgress(tmp_path, 0, ROLES, read_local(tmp_path), t0=0.0,
                              clock=lambda: now[0])
    lines: list[str] = []
    progress.update([_mark(tmp_path, "round-0001/_stages/generate.json", 2.0)], lines.append)
    assert "rollouts/s" not in lines[-1]  # one generate stage: no interval yet
    for at, r in ((7.0, 2), (9.0, 3)):
        now[0] = at
        progress.update([_mark(tmp_path, f"round-{r:04d}/_stages/generate.json", 2.0)],
                        lines.append)
    assert lines[-1].endswith("| 60 rollouts/s")  # 240 rollouts between 5 s and 9 s
    assert "generate r3 (v2)" in lines[-1]


def test_odd_markers_never_stop_the_view(tmp_path) -> None:
    progress = OnlineProgress(tmp_path, 0, ROLES, read_local(tmp_path))
    lines: list[str] = []
    odd = tmp_path / "round-0001" / "_stages" / "score.json"
    odd.parent.mkdir(parents=True)
    odd.write_text("[1, 2]")  # not an object
    (tmp_path / "round-0001" / "_stages" / "train.json").write_text('{"seconds": null}')
    progress.update(["round-0001.bak/_stages/generate.json", "round-0001/_stages/score.json",
                     "round-0001/_stages/train.json", "round-0001/_stages/gone.json"],
                    lines.append)
    assert len(lines) == 4
    assert any("round-0001.bak/generate done" in line for line in lines)
    assert progress.last_round("train") == 1 and progress.done[(1, "train")][0].seconds == 0.0


def test_markers_of_one_poll_print_in_plan_order(tmp_path) -> None:
    progress = OnlineProgress(tmp_path, 0, ROLES, read_local(tmp_path))
    lines: list[str] = []
    names = ["round-0001/_stages/train.json", "round-0001/_stages/correct.json",
             "round-0001/_stages/generate.json", "round-0000/_stages/eval-heldout.json",
             "round-0001/_stages/score.json"]
    progress.update([_mark(tmp_path, n, 1.0) for n in names], lines.append)
    assert [line.split("]")[1].split(" done")[0].strip() for line in lines] == [
        "round-0000/eval-heldout", "round-0001/generate", "round-0001/score",
        "round-0001/correct", "round-0001/train"]
